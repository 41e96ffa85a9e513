//! Feeds arbitrary bytes to the request decoding the server runs on every
//! frame (header, version checks, body): it must return, never panic or
//! abort, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_kafka::decode_request_frame(data);
});
