//! cargo-fuzz target `config`; the harness is `ironstar_fuzz::config::run`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ironstar_fuzz::config::run(data));
