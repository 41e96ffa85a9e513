//! The one table of (API key, min version, max version) this broker serves.
//! ApiVersions answers with exactly this table, dispatch refuses versions
//! outside it, and the README lists it.

use kafka_protocol::messages::ApiKey;

/// Every API Sluice implements, with the inclusive version range it serves.
///
/// Ranges stop below versions that need features Sluice does not have:
/// Produce v12+ and InitProducerId v5+ (transactions v2, KIP-890), Fetch
/// v17+ (KRaft replica directories), ListOffsets v7+ (max-timestamp lookup),
/// FindCoordinator v5+ (share groups),
/// DescribeCluster v2+ (fenced brokers).
///
/// One exception to "advertised = served": Produce is advertised from v0
/// but v0-v2 (the pre-RecordBatch message formats) are refused with
/// UNSUPPORTED_VERSION (`ADVERTISED_NOT_SERVED`). librdkafka releases
/// with issue #4956 (e.g. 2.0.2, Debian's kcat 1.7.1) only compress with
/// gzip, snappy or lz4 when the broker's Produce range includes v0, and
/// otherwise silently send uncompressed batches; they always pick v7+ to
/// send. Kafka 4.0 does the same for the same reason (KAFKA-18659).
pub const SUPPORTED_APIS: &[(i16, i16, i16)] = &[
    // v0-v2 advertised for old librdkafka's compression check, refused.
    (ApiKey::Produce as i16, 0, 11),
    (ApiKey::Fetch as i16, 4, 16),
    (ApiKey::ListOffsets as i16, 1, 6),
    (ApiKey::Metadata as i16, 0, 12),
    (ApiKey::OffsetCommit as i16, 2, 9),
    (ApiKey::OffsetFetch as i16, 1, 9),
    (ApiKey::FindCoordinator as i16, 0, 4),
    (ApiKey::JoinGroup as i16, 0, 9),
    (ApiKey::Heartbeat as i16, 0, 4),
    (ApiKey::LeaveGroup as i16, 0, 5),
    (ApiKey::SyncGroup as i16, 0, 5),
    (ApiKey::DescribeGroups as i16, 0, 6),
    (ApiKey::ListGroups as i16, 0, 5),
    // The consumer group protocol (KIP-848).
    (ApiKey::ConsumerGroupHeartbeat as i16, 0, 1),
    (ApiKey::ConsumerGroupDescribe as i16, 0, 1),
    (ApiKey::ApiVersions as i16, 0, 3),
    (ApiKey::CreateTopics as i16, 2, 7),
    (ApiKey::DeleteTopics as i16, 1, 6),
    (ApiKey::DeleteRecords as i16, 0, 2),
    (ApiKey::InitProducerId as i16, 0, 4),
    (ApiKey::OffsetForLeaderEpoch as i16, 2, 4),
    // Transactions: AddPartitionsToTxn in the clients' form (v0-3) and the
    // brokers' batched, verifying one (v4-5, KIP-890), AddOffsetsToTxn,
    // EndTxn and TxnOffsetCommit before transactions v2, and the markers
    // brokers write for each other.
    (ApiKey::AddPartitionsToTxn as i16, 0, 5),
    (ApiKey::AddOffsetsToTxn as i16, 0, 3),
    (ApiKey::EndTxn as i16, 0, 3),
    (ApiKey::WriteTxnMarkers as i16, 1, 1),
    (ApiKey::TxnOffsetCommit as i16, 0, 3),
    (ApiKey::DescribeConfigs as i16, 1, 4),
    (ApiKey::ElectLeaders as i16, 0, 2),
    (ApiKey::AlterPartitionReassignments as i16, 0, 1),
    (ApiKey::ListPartitionReassignments as i16, 0, 0),
    (ApiKey::DescribeClientQuotas as i16, 0, 1),
    (ApiKey::AlterClientQuotas as i16, 0, 1),
    (ApiKey::AlterConfigs as i16, 0, 2),
    (ApiKey::CreatePartitions as i16, 0, 3),
    (ApiKey::DeleteGroups as i16, 0, 2),
    (ApiKey::OffsetDelete as i16, 0, 0),
    (ApiKey::IncrementalAlterConfigs as i16, 0, 1),
    (ApiKey::DescribeCluster as i16, 0, 1),
    (ApiKey::DescribeProducers as i16, 0, 0),
    (ApiKey::DescribeLogDirs as i16, 1, 4),
    (ApiKey::DescribeTransactions as i16, 0, 0),
    (ApiKey::ListTransactions as i16, 0, 2),
];

/// (API key, min, max) ranges inside SUPPORTED_APIS that are advertised
/// only for client compatibility and answered with UNSUPPORTED_VERSION.
pub(crate) const ADVERTISED_NOT_SERVED: &[(i16, i16, i16)] = &[(ApiKey::Produce as i16, 0, 2)];

/// True when `version` of `api_key` is advertised but refused
/// (see [`ADVERTISED_NOT_SERVED`]).
pub(crate) fn refused(api_key: i16, version: i16) -> bool {
    ADVERTISED_NOT_SERVED
        .iter()
        .any(|&(key, min, max)| key == api_key && (min..=max).contains(&version))
}

/// The advertised version range of `api_key`, None when the API is not served.
pub(crate) fn supported_range(api_key: i16) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(key, _, _)| *key == api_key)
        .map(|&(_, min, max)| (min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every advertised range must be encodable by the codec crate, or a
    /// client could pick a version we cannot answer.
    #[test]
    fn table_within_codec_ranges() {
        for &(key, min, max) in SUPPORTED_APIS {
            let api = ApiKey::try_from(key).expect("known api key");
            let codec = api.valid_versions();
            assert!(min <= max, "{api:?}");
            assert!(
                codec.min <= min && max <= codec.max,
                "{api:?} {min}-{max} vs {codec}"
            );
        }
        // Group APIs are answered by sluice-group: never advertise more
        // than it handles.
        for &(key, min, max) in sluice_group::SUPPORTED_VERSIONS {
            if let Some((ours_min, ours_max)) = supported_range(key) {
                assert!(min <= ours_min && ours_max <= max, "group api {key}");
            }
        }
        for key in [8, 9, 11, 12, 13, 14, 15, 16, 42, 68, 69] {
            assert!(
                sluice_group::SUPPORTED_VERSIONS.iter().any(|e| e.0 == key),
                "group api {key} not handled by sluice-group"
            );
        }
        // A refused range must sit at the bottom of an advertised one, so
        // the versions actually served stay one contiguous range.
        for &(key, min, max) in ADVERTISED_NOT_SERVED {
            let (ours_min, ours_max) = supported_range(key).expect("refused api is advertised");
            assert!(ours_min == min && max < ours_max, "refused range of {key}");
        }
        assert!(refused(ApiKey::Produce as i16, 0) && refused(ApiKey::Produce as i16, 2));
        assert!(!refused(ApiKey::Produce as i16, 3) && !refused(ApiKey::Fetch as i16, 0));
        let mut keys: Vec<i16> = SUPPORTED_APIS.iter().map(|e| e.0).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), SUPPORTED_APIS.len(), "duplicate api key");
    }
}
