//! cargo-fuzz target `text_negotiation`; the harness is `ironstar_fuzz::login::run`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ironstar_fuzz::login::run(data));
