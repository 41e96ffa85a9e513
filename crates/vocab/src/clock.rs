//! Kafka's timestamps: milliseconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// The wall clock as Kafka stamps records, transactions and offsets: 0 for a
/// clock set before 1970, saturating far in the future.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_is_after_this_code_was_written() {
        // 2026-01-01T00:00:00Z
        assert!(super::now_ms() > 1_767_225_600_000);
    }
}
