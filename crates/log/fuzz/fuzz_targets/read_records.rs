//! Feeds arbitrary bytes to the in-place record reader as one batch: it must
//! never panic, stop at the first bad record, and every record it hands out
//! must lie inside the input. A transaction marker read from the same bytes
//! never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_log::{BatchHeader, Marker, PlainRecords};

fuzz_target!(|data: &[u8]| {
    let input = bytes::Bytes::copy_from_slice(data);
    if let Some(header) = BatchHeader::parse(data) {
        let _ = Marker::read(&header, input.clone());
    }
    if let Ok(records) = PlainRecords::new(input) {
        let mut failed = false;
        for record in records {
            assert!(!failed, "a record after an error");
            match record {
                Ok(r) => {
                    let inside = |b: &Option<bytes::Bytes>| b.as_ref().map_or(0, |b| b.len()) <= data.len();
                    assert!(inside(&r.key) && inside(&r.value));
                    assert_eq!(r.headers().count(), r.header_count());
                }
                Err(_) => failed = true,
            }
        }
    }
});
