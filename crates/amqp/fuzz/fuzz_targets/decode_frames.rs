//! Feeds arbitrary bytes to the frame decoding every AMQP connection applies to
//! what its client sends (size check against frame_max, then amq-protocol's
//! method, content-header and body parsing): it must return, never panic, loop or
//! buffer a frame above frame_max, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_amqp::decode_client_bytes(data, 131_072);
});
