//! Feeds arbitrary bytes to the record-level check Produce runs on every
//! batch before appending: it must return, never panic, loop or allocate
//! beyond its input (compressed batches: beyond the decompressed-size
//! limit), whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_kafka::validate_records(data, 1 << 20);
});
