//! cargo-fuzz target `scsi_cdb`; the harness is `ironstar_fuzz::scsi::run`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ironstar_fuzz::scsi::run(data));
