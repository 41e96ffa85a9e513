//! Peer-session frames (what another node sends on the AMQP port after the
//! `SLUICEQ1` header): any bytes decode to some frames or an error, never a
//! panic, and no frame above the bound is allocated.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_amqp::decode_peer_bytes(data, 1 << 20);
});
