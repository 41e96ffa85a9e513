//! The error codes a response carries, as Kafka's `AbstractResponse.errorCounts`
//! lists them for its `ErrorsPerSec`: the top-level code of APIs that have
//! one, each per-topic or per-partition code of those that answer per topic
//! or partition. Walked once over the built response, before it is encoded;
//! nothing is allocated.

use kafka_protocol::messages::*;

/// A response whose error codes can be walked.
pub(crate) trait ErrorCounts {
    /// Calls `code` with each error code the response (encoded at `version`)
    /// carries, 0 for none; possibly never, for an empty answer.
    fn error_codes(&self, version: i16, code: &mut dyn FnMut(i16));
}

/// The top-level code only.
macro_rules! top_level {
    ($($ty:ty),* $(,)?) => {$(
        impl ErrorCounts for $ty {
            fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
                code(self.error_code);
            }
        }
    )*};
}

/// One code per entry of a list (topics, groups, resources).
macro_rules! per_entry {
    ($($ty:ty => $list:ident),* $(,)?) => {$(
        impl ErrorCounts for $ty {
            fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
                for entry in &self.$list {
                    code(entry.error_code);
                }
            }
        }
    )*};
}

/// One code per partition of each topic.
macro_rules! per_partition {
    ($($ty:ty => $topics:ident . $partitions:ident),* $(,)?) => {$(
        impl ErrorCounts for $ty {
            fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
                for topic in &self.$topics {
                    for partition in &topic.$partitions {
                        code(partition.error_code);
                    }
                }
            }
        }
    )*};
}

/// The top-level code (from the version that has one) and each partition's,
/// as Kafka counts them for these APIs.
macro_rules! top_level_and_per_partition {
    ($($ty:ty => since $since:literal, $topics:ident . $partitions:ident),* $(,)?) => {$(
        impl ErrorCounts for $ty {
            fn error_codes(&self, version: i16, code: &mut dyn FnMut(i16)) {
                if version >= $since {
                    code(self.error_code);
                }
                for topic in &self.$topics {
                    for partition in &topic.$partitions {
                        code(partition.error_code);
                    }
                }
            }
        }
    )*};
}

top_level!(
    JoinGroupResponse,
    SyncGroupResponse,
    HeartbeatResponse,
    InitProducerIdResponse,
    EndTxnResponse,
    LeaveGroupResponse,
    ListGroupsResponse,
    DescribeClusterResponse,
    ApiVersionsResponse,
    AddOffsetsToTxnResponse,
    ListTransactionsResponse,
    ListPartitionReassignmentsResponse,
    DescribeClientQuotasResponse,
    ConsumerGroupHeartbeatResponse,
);

per_entry!(
    CreateTopicsResponse => topics,
    DeleteTopicsResponse => responses,
    DescribeGroupsResponse => groups,
    ConsumerGroupDescribeResponse => groups,
    DeleteGroupsResponse => results,
    DescribeTransactionsResponse => transaction_states,
    CreatePartitionsResponse => results,
    DescribeConfigsResponse => results,
    IncrementalAlterConfigsResponse => responses,
    AlterConfigsResponse => responses,
    AlterClientQuotasResponse => entries,
);

per_partition!(
    ProduceResponse => responses.partition_responses,
    ListOffsetsResponse => topics.partitions,
    OffsetCommitResponse => topics.partitions,
    TxnOffsetCommitResponse => topics.partitions,
    DescribeProducersResponse => topics.partitions,
    OffsetForLeaderEpochResponse => topics.partitions,
    DeleteRecordsResponse => topics.partitions,
);

top_level_and_per_partition!(
    OffsetDeleteResponse => since 0, topics.partitions,
    ElectLeadersResponse => since 1, replica_election_results.partition_result,
    AlterPartitionReassignmentsResponse => since 0, responses.partitions,
);

impl ErrorCounts for DescribeLogDirsResponse {
    fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
        // Kafka counts the top-level code and each log dir's.
        code(self.error_code);
        for dir in &self.results {
            code(dir.error_code);
        }
    }
}

impl ErrorCounts for FetchResponse {
    fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
        code(self.error_code);
        for topic in &self.responses {
            for partition in &topic.partitions {
                code(partition.error_code);
            }
        }
    }
}

impl ErrorCounts for MetadataResponse {
    fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
        // Kafka counts topics and partitions only; the top-level code (v13+)
        // is set only when the request was refused as a whole.
        if self.error_code != 0 {
            code(self.error_code);
        }
        for topic in &self.topics {
            code(topic.error_code);
            for partition in &topic.partitions {
                code(partition.error_code);
            }
        }
    }
}

impl ErrorCounts for OffsetFetchResponse {
    fn error_codes(&self, version: i16, code: &mut dyn FnMut(i16)) {
        // v8 answers per group; before, one group at the top level.
        if version >= 8 {
            for group in &self.groups {
                code(group.error_code);
                for topic in &group.topics {
                    for partition in &topic.partitions {
                        code(partition.error_code);
                    }
                }
            }
        } else {
            code(self.error_code);
            for topic in &self.topics {
                for partition in &topic.partitions {
                    code(partition.error_code);
                }
            }
        }
    }
}

impl ErrorCounts for FindCoordinatorResponse {
    fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
        // v4 answers per key (batched lookups); before, at the top level.
        if self.coordinators.is_empty() {
            code(self.error_code);
        }
        for coordinator in &self.coordinators {
            code(coordinator.error_code);
        }
    }
}

impl ErrorCounts for AddPartitionsToTxnResponse {
    fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
        // As Kafka: the top-level code (v4+; 0 before) and every partition's,
        // whichever shape the version has.
        code(self.error_code);
        for txn in &self.results_by_transaction {
            for topic in &txn.topic_results {
                for partition in &topic.results_by_partition {
                    code(partition.partition_error_code);
                }
            }
        }
        for topic in &self.results_by_topic_v3_and_below {
            for partition in &topic.results_by_partition {
                code(partition.partition_error_code);
            }
        }
    }
}

impl ErrorCounts for WriteTxnMarkersResponse {
    fn error_codes(&self, _version: i16, code: &mut dyn FnMut(i16)) {
        for marker in &self.markers {
            for topic in &marker.topics {
                for partition in &topic.partitions {
                    code(partition.error_code);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::produce_response::{
        PartitionProduceResponse, TopicProduceResponse,
    };

    fn codes<R: ErrorCounts>(resp: &R, version: i16) -> Vec<i16> {
        let mut seen = Vec::new();
        resp.error_codes(version, &mut |c| seen.push(c));
        seen
    }

    #[test]
    fn produce_counts_each_partition() {
        let topic = |codes: &[i16]| {
            TopicProduceResponse::default().with_partition_responses(
                codes
                    .iter()
                    .map(|&c| PartitionProduceResponse::default().with_error_code(c))
                    .collect(),
            )
        };
        let resp = ProduceResponse::default().with_responses(vec![topic(&[0, 6]), topic(&[0])]);
        assert_eq!(codes(&resp, 9), vec![0, 6, 0]);
    }

    #[test]
    fn find_coordinator_counts_per_key_from_v4() {
        let old = FindCoordinatorResponse::default().with_error_code(15);
        assert_eq!(codes(&old, 3), vec![15]);
        let batched = FindCoordinatorResponse::default().with_coordinators(vec![
            find_coordinator_response::Coordinator::default(),
            find_coordinator_response::Coordinator::default().with_error_code(14),
        ]);
        assert_eq!(codes(&batched, 4), vec![0, 14]);
    }

    #[test]
    fn offset_fetch_counts_groups_from_v8() {
        use offset_fetch_response::*;
        let group = OffsetFetchResponseGroup::default()
            .with_error_code(16)
            .with_topics(vec![OffsetFetchResponseTopics::default()
                .with_partitions(vec![OffsetFetchResponsePartitions::default()])]);
        let resp = OffsetFetchResponse::default().with_groups(vec![group]);
        assert_eq!(codes(&resp, 8), vec![16, 0]);
        let old = OffsetFetchResponse::default().with_error_code(15);
        assert_eq!(codes(&old, 7), vec![15]);
    }

    #[test]
    fn metadata_counts_topics_and_partitions() {
        use metadata_response::*;
        let resp = MetadataResponse::default().with_topics(vec![
            MetadataResponseTopic::default().with_error_code(3),
            MetadataResponseTopic::default()
                .with_partitions(vec![MetadataResponsePartition::default().with_error_code(5)]),
        ]);
        assert_eq!(codes(&resp, 12), vec![3, 0, 5]);
    }
}
