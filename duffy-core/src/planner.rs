//! Pool sizing: a pure function from the farm's state to the work that
//! keeps every warm pool at its standby target.
//!
//! [`plan`] reads nothing and changes nothing. The reconciler feeds it the
//! per-pool Ready counts, the candidate nodes (not the whole farm), the
//! targets, the policy, the time and what is already in flight, and
//! executes what it returns.

use std::collections::{BTreeMap, HashSet};

use crate::model::{Node, NodeId, PoolKey, PoolTarget};
use crate::policy::Policy;
use crate::state::NodeState;
use crate::time::Timestamp;

/// Why a node is to be installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstallReason {
    /// Its pool is below its standby target.
    Fill,
    /// Its image is older than the reinstall age.
    Stale,
}

/// One install the planner wants started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedInstall {
    /// The machine.
    pub node: NodeId,
    /// The image to put on it.
    pub image: PoolKey,
    /// Why the planner chose this node (fill a short pool, or refresh a
    /// stale image).
    pub reason: InstallReason,
}

/// A pool's numbers as the planner saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool.
    pub pool: PoolKey,
    /// Its standby target.
    pub standby: u32,
    /// Ready nodes carrying its image.
    pub ready: u32,
    /// Nodes being installed with its image.
    pub provisioning: u32,
    /// Still missing after this plan's installs start.
    pub unfilled: u32,
}

/// Inputs to [`plan`].
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Ready nodes per pool (every pool with Ready nodes, targeted or not).
    pub ready: &'a BTreeMap<PoolKey, u32>,
    /// The candidate nodes, ordered by id: every Active, Provisioning and
    /// Failed node, the stale Ready nodes (oldest installs first may be cut
    /// off; see [`Plan::more_stale_wanted`]) and, only while paused, every
    /// Ready node. Other nodes may be included; they are ignored.
    pub nodes: &'a [Node],
    /// Standby targets.
    pub targets: &'a [PoolTarget],
    /// The policy (reinstall age, concurrency).
    pub policy: &'a Policy,
    /// The time the plan is made for: cool-downs and image ages are
    /// measured against it.
    pub now: Timestamp,
    /// The service is paused: install nothing, power the warm pool down.
    pub paused: bool,
    /// Nodes with an operation already running.
    pub busy_nodes: &'a HashSet<NodeId>,
    /// BMCs with an operation already running (one at a time per BMC).
    pub busy_bmcs: &'a HashSet<String>,
    /// Installs already running.
    pub installs_in_flight: usize,
}

/// What the reconciler should do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Installs to start, at most the free concurrency.
    pub installs: Vec<PlannedInstall>,
    /// Ready nodes to take out of the warm pool and power down: everything
    /// Ready while paused, and stale nodes of pools that have more than
    /// their target.
    pub power_downs: Vec<NodeId>,
    /// Failed nodes (held by no session) whose cool-down ran out.
    pub expired_failures: Vec<NodeId>,
    /// Per-pool numbers, in target order.
    pub pools: Vec<PoolStatus>,
    /// After the last stale Ready node it was given, the plan still had a
    /// free install slot or a pool with surplus Ready nodes: had it been
    /// given more stale nodes (if there are more), it might have acted on
    /// them.
    pub more_stale_wanted: bool,
}

/// Decides which idle machines to install with which image, which stale
/// Ready nodes to cycle, and what to power down.
///
/// - Pools below target are filled largest deficit first, so that scarce
///   hardware is shared out evenly rather than given to the first pool.
/// - Among the machines that can carry an image (arch, flavor; i386 on
///   x86_64), the least used is picked first, then the lowest id, so every
///   machine is exercised.
/// - Ready nodes older than the reinstall age are reinstalled in place
///   (oldest first) with whatever concurrency the fills left over; in a
///   pool above its target they are powered down instead.
/// - Never more than `max_concurrent_installs` in flight, never two
///   operations on one BMC.
pub fn plan(input: PlanInput<'_>) -> Plan {
    let PlanInput {
        ready: ready_counts,
        nodes,
        targets,
        policy,
        now,
        paused,
        busy_nodes,
        busy_bmcs,
        installs_in_flight,
    } = input;
    let mut out = Plan::default();

    // Count what each pool has (Ready or on its way).
    let ready: BTreeMap<&PoolKey, u32> = ready_counts.iter().map(|(p, c)| (p, *c)).collect();
    let mut provisioning: BTreeMap<&PoolKey, u32> = BTreeMap::new();
    for n in nodes {
        match (n.state, &n.image) {
            (NodeState::Provisioning, Some(img)) => *provisioning.entry(img).or_default() += 1,
            (NodeState::Failed, _) if n.session.is_none() && n.hold_until.is_some_and(|t| t <= now) => {
                out.expired_failures.push(n.id)
            }
            _ => {}
        }
    }

    let mut bmcs_taken: HashSet<&str> = busy_bmcs.iter().map(String::as_str).collect();
    let free = |n: &Node, bmcs: &HashSet<&str>| !busy_nodes.contains(&n.id) && !bmcs.contains(n.bmc_key());

    if paused {
        for n in nodes {
            if n.state == NodeState::Ready && free(n, &bmcs_taken) {
                bmcs_taken.insert(n.bmc_key());
                out.power_downs.push(n.id);
            }
        }
        out.pools = targets
            .iter()
            .map(|t| PoolStatus {
                pool: t.pool.clone(),
                standby: t.standby,
                ready: ready.get(&t.pool).copied().unwrap_or(0),
                provisioning: provisioning.get(&t.pool).copied().unwrap_or(0),
                unfilled: 0,
            })
            .collect();
        return out;
    }

    let mut slots = policy.max_concurrent_installs.saturating_sub(installs_in_flight);

    // Deficit per target, in target order.
    let mut deficits: Vec<(usize, u32)> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let have = ready.get(&t.pool).copied().unwrap_or(0) + provisioning.get(&t.pool).copied().unwrap_or(0);
            (i, t.standby.saturating_sub(have))
        })
        .collect();

    // Idle hardware, least used first.
    let mut idle: Vec<&Node> = nodes.iter().filter(|n| n.state == NodeState::Active).collect();
    idle.sort_by_key(|n| (n.used_count, n.id));
    let mut taken: HashSet<NodeId> = HashSet::new();
    // Where each target's search of `idle` goes on from: a machine passed
    // over for a target stays unusable for it for the rest of the plan
    // (taken, on a BMC now busy — `bmcs_taken` only grows — or unable to
    // carry the image), so each target scans `idle` once in all, not once
    // per install (which made a pass that refills hundreds of released
    // machines quadratic in them).
    let mut cursor: Vec<usize> = vec![0; targets.len()];

    while slots > 0 {
        // The pool missing most; ties go to the earlier target.
        let Some(&(ti, _)) = deficits.iter().filter(|(_, d)| *d > 0).max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        else {
            break;
        };
        let pool = &targets[ti].pool;
        let from = cursor[ti];
        let found = idle[from..]
            .iter()
            .position(|n| !taken.contains(&n.id) && free(n, &bmcs_taken) && n.can_host(pool))
            .map(|i| from + i);
        cursor[ti] = found.map_or(idle.len(), |i| i + 1);
        match found.map(|i| idle[i]) {
            Some(n) => {
                taken.insert(n.id);
                bmcs_taken.insert(n.bmc_key());
                out.installs.push(PlannedInstall { node: n.id, image: pool.clone(), reason: InstallReason::Fill });
                slots -= 1;
                if let Some(d) = deficits.iter_mut().find(|(i, _)| *i == ti) {
                    d.1 -= 1;
                }
            }
            // No hardware for this pool now: stop asking for it.
            None => deficits.retain(|(i, _)| *i != ti),
        }
    }

    // Stale Ready nodes, oldest first.
    let standby_of = |p: &PoolKey| targets.iter().find(|t| &t.pool == p).map(|t| t.standby).unwrap_or(0);
    let mut stale: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Ready && n.installed_at.is_some_and(|t| now.since(t) >= policy.reinstall_age))
        .collect();
    stale.sort_by_key(|n| (n.installed_at, n.id));
    let mut surplus: BTreeMap<&PoolKey, u32> = BTreeMap::new();
    for (p, r) in &ready {
        surplus.insert(p, r.saturating_sub(standby_of(p)));
    }
    for n in stale {
        if !free(n, &bmcs_taken) {
            continue;
        }
        let Some(img) = n.image.as_ref() else { continue };
        match surplus.get_mut(img) {
            Some(s) if *s > 0 => {
                *s -= 1;
                bmcs_taken.insert(n.bmc_key());
                out.power_downs.push(n.id);
            }
            _ if slots > 0 => {
                slots -= 1;
                bmcs_taken.insert(n.bmc_key());
                out.installs.push(PlannedInstall { node: n.id, image: img.clone(), reason: InstallReason::Stale });
            }
            _ => {}
        }
    }
    out.more_stale_wanted = slots > 0 || surplus.values().any(|s| *s > 0);

    out.pools = targets
        .iter()
        .enumerate()
        .map(|(i, t)| PoolStatus {
            pool: t.pool.clone(),
            standby: t.standby,
            ready: ready.get(&t.pool).copied().unwrap_or(0),
            provisioning: provisioning.get(&t.pool).copied().unwrap_or(0),
            unfilled: deficits.iter().find(|(j, _)| *j == i).map(|(_, d)| *d).unwrap_or_else(|| {
                // Dropped for lack of hardware: report what is still missing.
                let have = ready.get(&t.pool).copied().unwrap_or(0)
                    + provisioning.get(&t.pool).copied().unwrap_or(0)
                    + out.installs.iter().filter(|p| p.image == t.pool).count() as u32;
                t.standby.saturating_sub(have)
            }),
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, NewNode};
    use std::time::Duration;

    fn farm(n: u64, arch: Arch) -> Vec<Node> {
        (1..=n).map(|i| NewNode::new(format!("n{i}"), arch).into_node(NodeId(i), Timestamp(0))).collect()
    }

    /// Ready nodes per pool, counted the way a store's `ready_counts` does.
    fn ready_of(nodes: &[Node]) -> BTreeMap<PoolKey, u32> {
        let mut m = BTreeMap::new();
        for n in nodes {
            if let (NodeState::Ready, Some(p)) = (n.state, &n.image) {
                *m.entry(p.clone()).or_default() += 1;
            }
        }
        m
    }

    fn run(nodes: &[Node], targets: &[PoolTarget], policy: &Policy, now: Timestamp, paused: bool) -> Plan {
        plan(PlanInput {
            ready: &ready_of(nodes),
            nodes,
            targets,
            policy,
            now,
            paused,
            busy_nodes: &HashSet::new(),
            busy_bmcs: &HashSet::new(),
            installs_in_flight: 0,
        })
    }

    #[test]
    fn fills_largest_deficit_first_within_concurrency() {
        let nodes = farm(50, Arch::X86_64);
        let targets = PoolTarget::seed_defaults();
        let policy = Policy { max_concurrent_installs: 10, ..Policy::default() };
        let p = run(&nodes, &targets, &policy, Timestamp(0), false);
        assert_eq!(p.installs.len(), 10);
        let c7 = p.installs.iter().filter(|i| i.image.release == "7").count();
        // 20 vs 6/4/4/4: the big pool gets the first picks until deficits level out.
        assert!(c7 >= 8, "{c7}");
        // Distinct nodes.
        let ids: HashSet<_> = p.installs.iter().map(|i| i.node).collect();
        assert_eq!(ids.len(), 10);
    }

    #[test]
    fn least_used_hardware_first_and_i386_on_x86_64() {
        let mut nodes = farm(4, Arch::X86_64);
        nodes[0].used_count = 5;
        nodes[1].used_count = 1;
        let targets = vec![PoolTarget { pool: PoolKey::new("6", Arch::I386, None), standby: 2 }];
        let p = run(&nodes, &targets, &Policy::default(), Timestamp(0), false);
        let picked: Vec<u64> = p.installs.iter().map(|i| i.node.0).collect();
        assert_eq!(picked, vec![3, 4]);
    }

    #[test]
    fn arch_and_flavor_must_match() {
        let mut nodes = farm(2, Arch::Aarch64);
        nodes[1].flavor = Some("tiny".into());
        let targets = vec![
            PoolTarget { pool: PoolKey::new("8", Arch::Aarch64, None), standby: 5 },
            PoolTarget { pool: PoolKey::new("8", Arch::X86_64, None), standby: 5 },
        ];
        let p = run(&nodes, &targets, &Policy::default(), Timestamp(0), false);
        assert_eq!(p.installs.len(), 1);
        assert_eq!(p.installs[0].node, NodeId(2));
        assert_eq!(p.pools[0].unfilled, 4);
        assert_eq!(p.pools[1].unfilled, 5);
    }

    #[test]
    fn counts_ready_and_provisioning_and_respects_in_flight() {
        let mut nodes = farm(10, Arch::X86_64);
        let pool = PoolKey::new("7", Arch::X86_64, None);
        for n in nodes.iter_mut().take(3) {
            n.state = NodeState::Ready;
            n.image = Some(pool.clone());
            n.installed_at = Some(Timestamp(0));
        }
        nodes[3].state = NodeState::Provisioning;
        nodes[3].image = Some(pool.clone());
        let targets = vec![PoolTarget { pool, standby: 6 }];
        let policy = Policy { max_concurrent_installs: 3, ..Policy::default() };
        let busy = HashSet::from([NodeId(4)]);
        let p = plan(PlanInput {
            ready: &ready_of(&nodes),
            nodes: &nodes,
            targets: &targets,
            policy: &policy,
            now: Timestamp(1),
            paused: false,
            busy_nodes: &busy,
            busy_bmcs: &HashSet::new(),
            installs_in_flight: 1,
        });
        assert_eq!(p.installs.len(), 2, "6 - 3 ready - 1 provisioning = 2, and 3 - 1 in flight = 2 slots");
    }

    #[test]
    fn one_operation_per_bmc() {
        let mut nodes = farm(4, Arch::X86_64);
        for n in &mut nodes {
            n.bmc = Some("shared-bmc".into());
        }
        let targets = vec![PoolTarget { pool: PoolKey::new("7", Arch::X86_64, None), standby: 4 }];
        let p = run(&nodes, &targets, &Policy::default(), Timestamp(0), false);
        assert_eq!(p.installs.len(), 1);
    }

    #[test]
    fn stale_nodes_are_reinstalled_or_retired() {
        let mut nodes = farm(6, Arch::X86_64);
        let pool = PoolKey::new("7", Arch::X86_64, None);
        for n in nodes.iter_mut().take(4) {
            n.state = NodeState::Ready;
            n.image = Some(pool.clone());
            n.installed_at = Some(Timestamp(0));
        }
        let day = Duration::from_secs(86_400);
        let targets = vec![PoolTarget { pool: pool.clone(), standby: 3 }];
        let p = run(&nodes, &targets, &Policy::default(), Timestamp(0).plus(day), false);
        assert_eq!(p.power_downs.len(), 1, "one surplus node retires");
        let stale: Vec<_> = p.installs.iter().filter(|i| i.reason == InstallReason::Stale).collect();
        assert_eq!(stale.len(), 3);
        // Not stale yet a millisecond earlier.
        let p =
            run(&nodes, &targets, &Policy::default(), Timestamp(0).plus(day).minus(Duration::from_millis(1)), false);
        assert!(p.installs.is_empty() && p.power_downs.is_empty());
    }

    #[test]
    fn the_oldest_stale_nodes_plan_the_same_once_no_more_are_wanted() {
        let mut nodes = farm(20, Arch::X86_64);
        let pool = PoolKey::new("7", Arch::X86_64, None);
        for (i, n) in nodes.iter_mut().enumerate() {
            n.state = NodeState::Ready;
            n.image = Some(pool.clone());
            n.installed_at = Some(Timestamp((i as i64 * 7) % 20));
        }
        let day = Duration::from_secs(86_400);
        let now = Timestamp(0).plus(day).plus(day);
        let targets = vec![PoolTarget { pool, standby: 15 }];
        let policy = Policy { max_concurrent_installs: 2, ..Policy::default() };
        let full = run(&nodes, &targets, &policy, now, false);
        assert_eq!((full.installs.len(), full.power_downs.len()), (2, 5));
        let ready = ready_of(&nodes);
        let mut oldest: Vec<Node> = nodes.clone();
        oldest.sort_by_key(|n| (n.installed_at, n.id));
        for k in 0..=oldest.len() {
            let p = plan(PlanInput {
                ready: &ready,
                nodes: &oldest[..k],
                targets: &targets,
                policy: &policy,
                now,
                paused: false,
                busy_nodes: &HashSet::new(),
                busy_bmcs: &HashSet::new(),
                installs_in_flight: 0,
            });
            // 5 surplus to power down and 2 slots: 7 nodes are enough.
            assert_eq!(p.more_stale_wanted, k < 7, "{k}");
            if !p.more_stale_wanted {
                assert_eq!((&p.installs, &p.power_downs), (&full.installs, &full.power_downs), "{k}");
            }
        }
    }

    #[test]
    fn paused_installs_nothing_and_powers_down_ready() {
        let mut nodes = farm(3, Arch::X86_64);
        nodes[0].state = NodeState::Ready;
        nodes[0].image = Some(PoolKey::new("7", Arch::X86_64, None));
        let targets = PoolTarget::seed_defaults();
        let p = run(&nodes, &targets, &Policy::default(), Timestamp(0), true);
        assert!(p.installs.is_empty());
        assert_eq!(p.power_downs, vec![NodeId(1)]);
    }

    #[test]
    fn expired_failures_are_reported() {
        let mut nodes = farm(3, Arch::X86_64);
        nodes[0].state = NodeState::Failed;
        nodes[0].hold_until = Some(Timestamp(10));
        nodes[1].state = NodeState::Failed; // held until an operator acts
        nodes[2].state = NodeState::Failed;
        nodes[2].hold_until = Some(Timestamp(5));
        nodes[2].session = Some(crate::SessionId("s".into())); // a session's hold: the reconciler reclaims sessions
        let p = run(&nodes, &[], &Policy::default(), Timestamp(10), false);
        assert_eq!(p.expired_failures, vec![NodeId(1)]);
    }
}
