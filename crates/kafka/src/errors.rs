//! Storage errors to Kafka error codes.

use kafka_protocol::ResponseError;
use sluice_log::LogError;

/// The Kafka error a storage error is reported as. Disk errors are logged
/// here, once, because the client only sees KAFKA_STORAGE_ERROR.
pub(crate) fn log_error(e: &LogError) -> ResponseError {
    match e {
        LogError::CorruptBatch(_) => ResponseError::CorruptMessage,
        LogError::InvalidRecord(_) => ResponseError::InvalidRecord,
        LogError::MessageTooLarge { .. } => ResponseError::MessageTooLarge,
        LogError::OutOfOrderSequence { .. } => ResponseError::OutOfOrderSequenceNumber,
        LogError::InvalidProducerEpoch { .. } => ResponseError::InvalidProducerEpoch,
        LogError::OffsetOutOfRange { .. } | LogError::ReplicaOffsetMismatch { .. } => {
            ResponseError::OffsetOutOfRange
        }
        LogError::UnknownTopicOrPartition(_) => ResponseError::UnknownTopicOrPartition,
        LogError::TopicAlreadyExists(_) => ResponseError::TopicAlreadyExists,
        LogError::InvalidTopic(..) => ResponseError::InvalidTopicException,
        LogError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        LogError::InvalidConfig(_) => ResponseError::InvalidConfig,
        LogError::Io(err) => {
            tracing::error!(error = %err, "storage error");
            ResponseError::KafkaStorageError
        }
    }
}

/// The error code of a storage error.
pub(crate) fn code(e: &LogError) -> i16 {
    log_error(e).code()
}
