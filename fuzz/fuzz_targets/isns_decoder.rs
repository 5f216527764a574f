//! cargo-fuzz target `isns_decoder`; the harness is `ironstar_fuzz::isns::run`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ironstar_fuzz::isns::run(data));
