//! Feeds arbitrary bytes to the RecordBatch v2 validator: it must never
//! panic, and whatever it accepts must have correct CRCs and lengths.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(headers) = sluice_log::validate_batches(data) {
        assert!(!headers.is_empty());
        let total: usize = headers.iter().map(|h| h.size()).sum();
        assert_eq!(total, data.len(), "accepted batches must cover the input exactly");
        let mut rest = data;
        for h in &headers {
            let (batch, tail) = rest.split_at(h.size());
            assert_eq!(crc32c::crc32c(&batch[21..]), h.crc);
            assert_eq!(h.records_count, h.last_offset_delta + 1);
            rest = tail;
        }
    }
});
