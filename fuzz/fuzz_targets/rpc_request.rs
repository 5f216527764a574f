//! cargo-fuzz target `rpc_request`; the harness is `ironstar_fuzz::rpc::run`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ironstar_fuzz::rpc::run(data));
