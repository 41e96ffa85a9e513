//! DescribeLogDirs: the partitions this node stores, with their sizes on
//! disk, and the space of the disk under the data directory: what disk-usage
//! dashboards and rebalancing tools (Cruise Control) read. A node has one
//! log dir, its data directory.

use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use sluice_log::{Partition, Store};

use crate::server::Ctx;

pub(crate) fn describe_log_dirs(ctx: &Ctx, req: DescribeLogDirsRequest) -> DescribeLogDirsResponse {
    let store = ctx.topology.store();
    // Null asks for every partition; a partition asked for that this node
    // does not store is left out, as Kafka does.
    let asked: Vec<(String, Vec<i32>)> = match req.topics {
        None => store
            .topics()
            .into_iter()
            .map(|t| {
                let partitions = (0..t.partitions)
                    .filter_map(|p| i32::try_from(p).ok())
                    .collect();
                (t.name, partitions)
            })
            .collect(),
        Some(topics) => topics
            .into_iter()
            .map(|t| (t.topic.0.to_string(), t.partitions))
            .collect(),
    };
    let topics = asked
        .into_iter()
        .filter_map(|(name, partitions)| {
            let partitions: Vec<DescribeLogDirsPartition> = partitions
                .into_iter()
                .filter_map(|p| store.partition(&name, p).map(|part| described(p, &part)))
                .collect();
            (!partitions.is_empty()).then(|| {
                DescribeLogDirsTopic::default()
                    .with_name(TopicName(StrBytes::from_string(name)))
                    .with_partitions(partitions)
            })
        })
        .collect();
    DescribeLogDirsResponse::default().with_results(vec![log_dir(store).with_topics(topics)])
}

fn described(index: i32, p: &Partition) -> DescribeLogDirsPartition {
    DescribeLogDirsPartition::default()
        .with_partition_index(index)
        .with_partition_size(i64::try_from(p.size_bytes()).unwrap_or(i64::MAX))
        // Kafka's lag of a current (not future) log: how far its end is
        // below the high watermark, which only a replica catching up has.
        .with_offset_lag((p.high_watermark() - p.log_end_offset()).max(0))
}

/// The data directory and its disk's size and usable space (-1 unknown).
fn log_dir(store: &Store) -> DescribeLogDirsResult {
    let dir = store.data_dir();
    let space = sluice_log::disk_space(dir);
    // Kafka reports log dirs as absolute paths.
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let bytes = |b: Option<u64>| b.and_then(|b| i64::try_from(b).ok()).unwrap_or(-1);
    DescribeLogDirsResult::default()
        .with_log_dir(StrBytes::from_string(dir.display().to_string()))
        .with_total_bytes(bytes(space.map(|s| s.total_bytes)))
        .with_usable_bytes(bytes(space.map(|s| s.usable_bytes)))
}
