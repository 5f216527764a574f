//! cargo-fuzz target `pdu_decoder`; the harness is `ironstar_fuzz::pdu::run`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ironstar_fuzz::pdu::run(data));
