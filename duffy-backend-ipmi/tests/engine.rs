//! A whole reinstall cycle of simulated machines driven by the engine
//! through this backend, real IPMI packets to `ipmi_sim`, with one BMC dead:
//! that node ends Failed with the reason recorded, the others reach Ready.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::rig::{Rig, free_udp_ports};
use duffy_backend_ipmi::{Driver, IpmiPowerController};
use duffy_core::clock::SystemClock;
use duffy_core::mem::MemStore;
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{
    Actor, Arch, BootDevice, CauseKind, Clock, Engine, EventQuery, InstallError, Installed, Installer, NewNode, Node,
    NodeState, Policy, PoolKey, PoolTarget, PowerAction, PowerController, Store,
};

/// Reinstalls the way a PXE install starts: next boot from the network,
/// power cycle, a moment for the "installer", then back to disk.
struct NetbootInstaller {
    power: Arc<dyn PowerController>,
}

#[async_trait]
impl Installer for NetbootInstaller {
    async fn install(&self, node: &Node, _image: &PoolKey) -> Result<Installed, InstallError> {
        self.power
            .set_next_boot(node, BootDevice::Pxe)
            .await
            .map_err(|e| InstallError::new(format!("next boot PXE: {e}")))?;
        self.power.power(node, PowerAction::Cycle).await.map_err(|e| InstallError::new(format!("power cycle: {e}")))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.power
            .set_next_boot(node, BootDevice::Disk)
            .await
            .map_err(|e| InstallError::new(format!("next boot disk: {e}")))?;
        Ok(Installed::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinstall_cycle_through_ipmi_with_one_dead_bmc() {
    const N: usize = 5;
    const DEAD: usize = 2;
    let rig = Rig::start(N);
    let mut inventory = rig.inventory(Driver::Native, |_| {});
    // Node 2's BMC is dead: nothing listens on its port.
    let mut dead = rig.bmc(DEAD).config(Driver::Native);
    dead.port = free_udp_ports(1)[0];
    inventory.insert(Rig::hostname(DEAD), dead);
    let power: Arc<dyn PowerController> = Arc::new(IpmiPowerController::new(inventory));

    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let machines = (0..N)
        .map(|i| {
            let mut n = NewNode::new(Rig::hostname(i), Arch::X86_64);
            n.bmc = Some(format!("127.0.0.1:{}", rig.bmc(i).port));
            n
        })
        .collect();
    store.add_nodes(machines, Actor::Operator, clock.now()).await.unwrap();
    store.set_pool_target(PoolTarget { pool: PoolKey::new("7", Arch::X86_64, None), standby: N as u32 }).await.unwrap();
    let policy = Policy {
        install_timeout: Duration::from_secs(30),
        install_attempts: 2,
        install_backoff: Duration::from_millis(200),
        failed_retry_after: None,
        tick: Duration::from_millis(200),
        power_check_interval: None,
        ..Policy::default()
    };
    let installer = Arc::new(NetbootInstaller { power: power.clone() });
    let engine = Engine::builder(store.clone(), power.clone(), installer, clock).policy(policy).build().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let reconciler = tokio::spawn(engine.reconciler().run(async {
        let _ = stopped.await;
    }));

    let deadline = Instant::now() + Duration::from_secs(90);
    let nodes = loop {
        let nodes = store.nodes().await.unwrap();
        let settled = nodes.iter().all(|n| matches!(n.state, NodeState::Ready | NodeState::Failed));
        if settled {
            break nodes;
        }
        assert!(Instant::now() < deadline, "not settled: {:?}", nodes.iter().map(|n| n.state).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = stop.send(());
    reconciler.await.unwrap();

    for (i, n) in nodes.iter().enumerate() {
        if i == DEAD {
            assert_eq!(n.state, NodeState::Failed, "{}", n.hostname);
            let reason = n.fail_reason.as_deref().unwrap();
            assert!(reason.contains("failed after 2 attempts") && reason.contains("Unreachable"), "{reason}");
        } else {
            assert_eq!(n.state, NodeState::Ready, "{}: {:?}", n.hostname, n.fail_reason);
            // The BMC really was driven: powered on, told to boot from disk again.
            assert_eq!(rig.bmc(i).power(), "1", "{}", n.hostname);
            let log = rig.bmc(i).log().join("\n");
            assert!(log.contains("boot pxe"), "next boot PXE was set on {}: {log}", n.hostname);
        }
    }
    let dead_history = store.events(EventQuery { node: Some(nodes[DEAD].id), ..EventQuery::default() }).await.unwrap();
    let kinds: Vec<_> = dead_history.iter().map(|e| e.cause).collect();
    assert_eq!(
        kinds,
        vec![CauseKind::Added, CauseKind::InstallStarted, CauseKind::InstallAttemptFailed, CauseKind::InstallFailed]
    );
    assert!(dead_history[2].detail.as_deref().unwrap().contains("Unreachable"));
    check_invariants(&*store).await.unwrap();
    check_history(&*store).await.unwrap();
}
