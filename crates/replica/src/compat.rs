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

impl PartitionReplication for Partition {
    fn set_replicated(&self, _replicated: bool) {
        todo!("sluice-log: Partition::set_replicated")
    }
    fn durable_end_offset(&self) -> i64 {
        todo!("sluice-log: Partition::durable_end_offset")
    }
    fn watch_durable_end(&self) -> watch::Receiver<i64> {
        todo!("sluice-log: Partition::watch_durable_end")
    }
    fn advance_high_watermark(&self, _hw: i64) {
        todo!("sluice-log: Partition::advance_high_watermark")
    }
    fn append_replica(&self, _records: &[u8]) -> Result<i64, LogError> {
        todo!("sluice-log: Partition::append_replica")
    }
}

pub(crate) trait StoreReplication {
    fn ensure_topic(
        &self,
        name: &str,
        topic_id: [u8; 16],
        partitions: u32,
        configs: &BTreeMap<String, String>,
    ) -> Result<TopicInfo, LogError>;
}

impl StoreReplication for Store {
    fn ensure_topic(
        &self,
        _name: &str,
        _topic_id: [u8; 16],
        _partitions: u32,
        _configs: &BTreeMap<String, String>,
    ) -> Result<TopicInfo, LogError> {
        todo!("sluice-log: Store::ensure_topic")
    }
}
