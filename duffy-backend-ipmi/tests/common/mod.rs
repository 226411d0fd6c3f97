//! Shared by the integration tests (and the bench): the simulated-BMC rig
//! and the power test suite that both drivers must pass.

#![allow(dead_code, unused_macros, unused_imports)]

pub use duffy_testsupport::rig;
pub mod suite;

/// Generates the test suite as `#[tokio::test]` functions for one driver.
macro_rules! power_suite {
    ($driver:expr) => {
        $crate::common::power_suite!(@tests $driver;
            status_reports_the_state_file,
            on_and_off_are_idempotent,
            cycle_turns_off_then_on,
            reset_and_soft_off,
            next_boot_pxe_and_disk,
            twenty_bmcs_concurrently,
            operations_on_one_bmc_are_serialised,
            unknown_node_is_not_configured,
            wrong_password_is_auth_failed,
            unknown_user_is_auth_failed,
            closed_port_is_unreachable,
            stopped_bmc_is_unreachable_then_recovers,
            bmc_freezing_mid_operation_is_timeout,
            bmc_error_is_reported_in_its_words,
            slow_bmc_within_the_timeout_succeeds,
            slow_bmc_beyond_the_retries_is_timeout,
            deadline_bounds_an_operation,
            session_slots_exhausted_is_busy,
        );
    };
    (@tests $driver:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::common::suite::$name($driver).await
            }
        )*
    };
}
pub(crate) use power_suite;
