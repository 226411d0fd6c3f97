//! The power test suite with the native RMCP+ driver against simulated BMCs.

mod common;

common::power_suite!(duffy_backend_ipmi::Driver::Native);
