//! The simulated farm (feature `sim`): machines that exist only in memory.
//!
//! [`SimFarm`] is a [`PowerController`], an [`Installer`] and a
//! [`Contextualizer`] whose operations take seeded random time on the
//! injected [`Clock`] and fail at configured rates ([`SimConfig`]), with
//! switches to break particular machines. On the system clock it is the
//! embedded default of `duffy serve` and the way to try Duffy without
//! hardware; on the test kit's manual clock it is fully deterministic.
//! [`SeededSessionIds`] makes session ids reproducible too, so a
//! simulation run twice with the same seed writes the same history.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::SessionIds;
use crate::installer::{Contextualizer, InstallError, Installed, Installer, PrepareError};
use crate::model::{Arch, NewNode, Node, PoolKey, PowerState, Project, SessionId};
use crate::power::{BootDevice, PowerAction, PowerController, PowerError, PowerErrorKind};
use crate::time::{Clock, sleep};

/// Session ids from a seeded generator: UUID-shaped, reproducible.
#[derive(Debug)]
pub struct SeededSessionIds {
    rng: Mutex<ChaCha8Rng>,
}

impl SeededSessionIds {
    /// A generator with this seed.
    pub fn new(seed: u64) -> Self {
        SeededSessionIds { rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) }
    }
}

impl SessionIds for SeededSessionIds {
    fn next_id(&self, _now: crate::time::Timestamp) -> SessionId {
        let bytes: [u8; 16] = self.rng.lock().unwrap_or_else(|p| p.into_inner()).r#gen();
        SessionId(uuid::Builder::from_random_bytes(bytes).into_uuid().hyphenated().to_string())
    }
}

/// How the simulated farm behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Seed for latencies and failures.
    pub seed: u64,
    /// Shortest install.
    pub install_min: Duration,
    /// Longest install.
    pub install_max: Duration,
    /// Chance that one install attempt fails.
    pub install_failure_rate: f64,
    /// Time to prepare a node for a project.
    pub prepare_time: Duration,
    /// Chance that preparing a node fails.
    pub prepare_failure_rate: f64,
    /// Time of one power operation.
    pub power_latency: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            install_min: Duration::from_secs(3),
            install_max: Duration::from_secs(6),
            install_failure_rate: 0.0,
            prepare_time: Duration::from_millis(200),
            prepare_failure_rate: 0.0,
            power_latency: Duration::from_millis(50),
        }
    }
}

impl SimConfig {
    /// Whether the simulated farm has anything to prepare (a preparation
    /// time or a failure rate), i.e. whether it should be the engine's
    /// [`Contextualizer`]. Without one, allocation is a single write.
    pub fn prepares(&self) -> bool {
        !self.prepare_time.is_zero() || self.prepare_failure_rate > 0.0
    }
}

#[derive(Debug)]
struct SimState {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    power: HashMap<String, PowerState>,
    boot: HashMap<String, BootDevice>,
    broken_installs: HashSet<String>,
    broken_prepares: HashSet<String>,
    dead_bmcs: HashSet<String>,
    hung_installs: HashSet<String>,
}

/// A simulated farm: a [`PowerController`] and an [`Installer`] whose
/// operations take (seeded, random) time on the injected clock and fail at
/// configured rates, plus switches to break particular machines.
///
/// On the test kit's manual clock it is fully deterministic; on a real
/// clock it is the embedded default of `duffy serve`.
pub struct SimFarm {
    clock: Arc<dyn Clock>,
    state: Mutex<SimState>,
    installs: AtomicU64,
    install_failures: AtomicU64,
    prepares: AtomicU64,
}

impl std::fmt::Debug for SimFarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFarm").field("installs", &self.installs).finish_non_exhaustive()
    }
}

impl SimFarm {
    /// A farm on `clock` behaving as `cfg` says.
    pub fn new(clock: Arc<dyn Clock>, cfg: SimConfig) -> Self {
        SimFarm {
            clock,
            state: Mutex::new(SimState {
                rng: ChaCha8Rng::seed_from_u64(cfg.seed),
                cfg,
                power: HashMap::new(),
                boot: HashMap::new(),
                broken_installs: HashSet::new(),
                broken_prepares: HashSet::new(),
                dead_bmcs: HashSet::new(),
                hung_installs: HashSet::new(),
            }),
            installs: AtomicU64::new(0),
            install_failures: AtomicU64::new(0),
            prepares: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `count` x86_64 machines named `n1.sim.duffy` …, four to a chassis,
    /// each with its own BMC address.
    pub fn machines(count: usize) -> Vec<NewNode> {
        (1..=count)
            .map(|i| NewNode {
                hostname: format!("n{i}.sim.duffy"),
                ip: Some(format!("10.0.{}.{}", i / 250, i % 250 + 1)),
                chassis: Some(format!("chassis{}", (i - 1) / 4 + 1)),
                hardware_arch: Arch::X86_64,
                flavor: None,
                bmc: Some(format!("bmc-n{i}.sim.duffy")),
                console_port: Some(2000 + (i % 1000) as u16),
                reserved: false,
            })
            .collect()
    }

    /// The current behaviour (latencies, rates).
    pub fn config(&self) -> SimConfig {
        self.lock().cfg.clone()
    }

    /// Changes the behaviour (latencies, rates); keeps the random stream.
    pub fn configure(&self, f: impl FnOnce(&mut SimConfig)) {
        f(&mut self.lock().cfg)
    }

    /// Every install of this machine fails (or works again with `false`).
    pub fn break_install(&self, hostname: &str, broken: bool) {
        toggle(&mut self.lock().broken_installs, hostname, broken);
    }

    /// Every install of this machine hangs until its deadline.
    pub fn hang_install(&self, hostname: &str, hung: bool) {
        toggle(&mut self.lock().hung_installs, hostname, hung);
    }

    /// Preparing this machine for a project fails (e.g. SSH is down).
    pub fn break_prepare(&self, hostname: &str, broken: bool) {
        toggle(&mut self.lock().broken_prepares, hostname, broken);
    }

    /// This machine's BMC stops answering.
    pub fn kill_bmc(&self, hostname: &str, dead: bool) {
        toggle(&mut self.lock().dead_bmcs, hostname, dead);
    }

    /// Changes a machine's power behind Duffy's back (someone pressed the
    /// button), for power reconciliation tests.
    pub fn force_power(&self, hostname: &str, state: PowerState) {
        self.lock().power.insert(hostname.to_string(), state);
    }

    /// The simulated power state of a machine.
    pub fn power_of(&self, hostname: &str) -> PowerState {
        self.lock().power.get(hostname).copied().unwrap_or(PowerState::Off)
    }

    /// The simulated next boot device of a machine.
    pub fn boot_of(&self, hostname: &str) -> Option<BootDevice> {
        self.lock().boot.get(hostname).copied()
    }

    /// Install attempts started so far.
    pub fn installs(&self) -> u64 {
        self.installs.load(Ordering::Relaxed)
    }

    /// Install attempts that failed so far.
    pub fn install_failures(&self) -> u64 {
        self.install_failures.load(Ordering::Relaxed)
    }

    /// Preparations run so far.
    pub fn prepares(&self) -> u64 {
        self.prepares.load(Ordering::Relaxed)
    }
}

impl SimFarm {
    /// A dead BMC does not answer.
    fn check_bmc(&self, node: &Node) -> Result<(), PowerError> {
        if self.lock().dead_bmcs.contains(&node.hostname) {
            return Err(PowerError::new(
                PowerErrorKind::Unreachable,
                format!("no answer from the BMC of {}", node.hostname),
            ));
        }
        Ok(())
    }

    /// One request to the BMC: its latency, then its answer (or none).
    async fn bmc_round_trip(&self, node: &Node) -> Result<(), PowerError> {
        let latency = self.lock().cfg.power_latency;
        sleep(&*self.clock, latency).await;
        self.check_bmc(node)
    }
}

fn toggle(set: &mut HashSet<String>, name: &str, on: bool) {
    if on {
        set.insert(name.to_string());
    } else {
        set.remove(name);
    }
}

#[async_trait]
impl PowerController for SimFarm {
    async fn status(&self, node: &Node) -> Result<PowerState, PowerError> {
        self.bmc_round_trip(node).await?;
        Ok(self.power_of(&node.hostname))
    }

    async fn power(&self, node: &Node, action: PowerAction) -> Result<(), PowerError> {
        self.bmc_round_trip(node).await?;
        let st = match action {
            PowerAction::Off | PowerAction::Soft => PowerState::Off,
            PowerAction::On | PowerAction::Cycle | PowerAction::Reset => PowerState::On,
        };
        self.lock().power.insert(node.hostname.clone(), st);
        Ok(())
    }

    async fn set_next_boot(&self, node: &Node, device: BootDevice) -> Result<(), PowerError> {
        self.check_bmc(node)?;
        self.lock().boot.insert(node.hostname.clone(), device);
        Ok(())
    }
}

#[async_trait]
impl Installer for SimFarm {
    async fn install(&self, node: &Node, image: &PoolKey) -> Result<Installed, InstallError> {
        self.installs.fetch_add(1, Ordering::Relaxed);
        // Like a PXE install: next boot from the network, power cycle,
        // wait for the OS installer, come up from disk.
        self.set_next_boot(node, BootDevice::Pxe)
            .await
            .map_err(|e| InstallError::new(format!("setting next boot to PXE: {e}")))?;
        self.power(node, PowerAction::Cycle).await.map_err(|e| InstallError::new(format!("power cycle: {e}")))?;
        let (took, fails, hung) = {
            let mut s = self.lock();
            let (lo, hi) = (s.cfg.install_min, s.cfg.install_max.max(s.cfg.install_min));
            let span = (hi - lo).as_millis() as u64;
            let took = lo + Duration::from_millis(if span == 0 { 0 } else { s.rng.gen_range(0..=span) });
            let rate = s.cfg.install_failure_rate;
            let fails = s.broken_installs.contains(&node.hostname) || (rate > 0.0 && s.rng.gen_bool(rate.min(1.0)));
            (took, fails, s.hung_installs.contains(&node.hostname))
        };
        if hung {
            futures::future::pending::<()>().await;
        }
        sleep(&*self.clock, took).await;
        if fails {
            self.install_failures.fetch_add(1, Ordering::Relaxed);
            return Err(InstallError::new(format!("simulated install of {image} on {} failed", node.hostname)));
        }
        self.lock().boot.insert(node.hostname.clone(), BootDevice::Disk);
        Ok(Installed { host_key: None })
    }
}

#[async_trait]
impl Contextualizer for SimFarm {
    /// A simulated preparation: takes `prepare_time`, fails (blaming the
    /// node, like an unreachable machine) at `prepare_failure_rate` or on
    /// a node broken with [`SimFarm::break_prepare`]; a project with no
    /// SSH keys is accepted (the simulated machines need none).
    async fn prepare(&self, node: &Node, _project: &Project, _session: &SessionId) -> Result<(), PrepareError> {
        self.prepares.fetch_add(1, Ordering::Relaxed);
        let (took, fails) = {
            let mut s = self.lock();
            let rate = s.cfg.prepare_failure_rate;
            let fails = s.broken_prepares.contains(&node.hostname) || (rate > 0.0 && s.rng.gen_bool(rate.min(1.0)));
            (s.cfg.prepare_time, fails)
        };
        sleep(&*self.clock, took).await;
        if fails {
            return Err(PrepareError::node(format!("ssh to {}: connection refused (simulated)", node.hostname)));
        }
        Ok(())
    }
}
