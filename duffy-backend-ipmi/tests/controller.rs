//! Dispatch by configuration, and each driver used directly as a
//! `PowerController`.

mod common;

use std::sync::Arc;

use common::rig::{Rig, require_ipmitool};
use common::suite::node;
use duffy_backend_ipmi::{Driver, IpmiPowerController, IpmitoolDriver, NativeDriver};
use duffy_core::model::PowerState;
use duffy_core::power::{PowerAction, PowerController, PowerErrorKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_uses_the_driver_its_configuration_names() {
    let rig = Rig::start(2);
    let mut inv = rig.inventory(Driver::Native, |_| {});
    inv.insert(Rig::hostname(1), rig.bmc(1).config(Driver::Ipmitool));
    // An ipmitool that does not exist shows which nodes go through it.
    let ctl = IpmiPowerController::new(inv).with_ipmitool_program("/nonexistent/ipmitool");
    ctl.power(&node(0), PowerAction::On).await.expect("node 0 goes through the native driver");
    assert_eq!(rig.bmc(0).power(), "1");
    let e = ctl.status(&node(1)).await.expect_err("node 1 goes through ipmitool");
    assert_eq!(e.kind, PowerErrorKind::NotConfigured, "{e}");
    assert!(e.message.contains("/nonexistent/ipmitool") && e.message.contains("install"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_driver_is_a_power_controller() {
    require_ipmitool();
    let rig = Rig::start(1);
    // The configured driver is ignored when a driver is used directly.
    let inv = Arc::new(rig.inventory(Driver::Ipmitool, |_| {}));
    let native: Box<dyn PowerController> = Box::new(NativeDriver::new(inv.clone()));
    let ipmitool: Box<dyn PowerController> = Box::new(IpmitoolDriver::new(inv.clone()));
    native.power(&node(0), PowerAction::On).await.expect("native on");
    assert_eq!(ipmitool.status(&node(0)).await.expect("ipmitool status"), PowerState::On);
    ipmitool.power(&node(0), PowerAction::Off).await.expect("ipmitool off");
    assert_eq!(native.status(&node(0)).await.expect("native status"), PowerState::Off);
    let e = native.status(&node(5)).await.expect_err("node 5 has no BMC");
    assert_eq!(e.kind, PowerErrorKind::NotConfigured);
}
