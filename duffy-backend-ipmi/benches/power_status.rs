//! One power-status call (a whole operation: session setup, Get Chassis
//! Status, Close Session), native driver vs ipmitool, against one simulated
//! BMC (`ipmi_sim`, as in the tests).

use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_main};
use duffy_backend_ipmi::{BmcDriver, Driver, IpmitoolDriver, NativeDriver};
use duffy_testsupport::rig;

fn power_status(c: &mut Criterion) {
    rig::require_ipmitool();
    let rig = rig::Rig::start(1);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let native = NativeDriver::default();
    let ipmitool = IpmitoolDriver::default();
    let native_cfg = rig.bmc(0).config(Driver::Native);
    let ipmitool_cfg = rig.bmc(0).config(Driver::Ipmitool);

    let mut group = c.benchmark_group("power_status");
    // ipmitool takes tens of milliseconds a call: few, flat samples keep the
    // whole run short.
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("native", |b| {
        b.iter(|| runtime.block_on(native.status(&native_cfg)).expect("native status"));
    });
    group.bench_function("ipmitool", |b| {
        b.iter(|| runtime.block_on(ipmitool.status(&ipmitool_cfg)).expect("ipmitool status"));
    });
    group.finish();
}

/// criterion's macro makes a public function without docs.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::power_status);
}
criterion_main!(group::benches);
