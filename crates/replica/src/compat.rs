//! TEMPORARY: the `sluice-log` replication API of the team contract, until it lands in
//! crates/log. Inherent methods of the same names take precedence once they exist;
//! this module is then deleted.
#![allow(dead_code)]

use std::collections::BTreeMap;

use sluice_log::{LogError, Partition, Store, TopicInfo};
use tokio::sync::watch;

pub(crate) trait PartitionReplication {
    fn set_replicated(&self, replicated: bool);
    fn durable_end_offset(&self) -> i64;
    fn watch_durable_end(&self) -> watch::Receiver<i64>;
    fn advance_high_watermark(&self, hw: i64);
    fn append_replica(&self, records: &[u8]) -> Result<i64, LogError>;
}

// Local-mode approximations (HW = durable end), only so the flow runs meanwhile.
impl PartitionReplication for Partition {
    fn set_replicated(&self, _replicated: bool) {}
    fn durable_end_offset(&self) -> i64 {
        self.high_watermark()
    }
    fn watch_durable_end(&self) -> watch::Receiver<i64> {
        self.watch_high_watermark()
    }
    fn advance_high_watermark(&self, _hw: i64) {}
    fn append_replica(&self, records: &[u8]) -> Result<i64, LogError> {
        let mut pos = 0;
        while pos + 61 <= records.len() {
            let base = i64::from_be_bytes(records[pos..pos + 8].try_into().unwrap_or_default());
            let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().unwrap_or_default());
            let epoch =
                i32::from_be_bytes(records[pos + 12..pos + 16].try_into().unwrap_or_default());
            let size = 12 + len.max(0) as usize;
            if base != self.log_end_offset() {
                return Err(LogError::InvalidRecord(format!(
                    "replica offset mismatch: expected {}, got {base}",
                    self.log_end_offset()
                )));
            }
            let mut b = records[pos..(pos + size).min(records.len())].to_vec();
            b[0..8].copy_from_slice(&0i64.to_be_bytes());
            self.append(&b, epoch)?;
            pos += size;
        }
        Ok(self.log_end_offset())
    }
}

pub(crate) trait StoreReplication {
    fn ensure_topic(
        &self,
        name: &str,
        topic_id: [u8; 16],
        partitions: u32,
        _configs: &BTreeMap<String, String>,
    ) -> Result<TopicInfo, LogError>;
}

impl StoreReplication for Store {
    fn ensure_topic(
        &self,
        name: &str,
        _topic_id: [u8; 16],
        partitions: u32,
        _configs: &BTreeMap<String, String>,
    ) -> Result<TopicInfo, LogError> {
        match self.topic(name) {
            Some(t) => Ok(t),
            None => self.create_topic(name, partitions, &BTreeMap::new(), false),
        }
    }
}
