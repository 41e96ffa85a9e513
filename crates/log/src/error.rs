//! The storage engine's error type.

use sluice_vocab::{ConfigError, ErrorCode, InvalidTopicName, KafkaError};

/// Errors of the storage engine. Each is one Kafka error code (noted per
/// variant, [`KafkaError::error_code`]).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// CORRUPT_MESSAGE (2): bad CRC, bad length, bad magic, record count mismatch.
    #[error("corrupt record batch: {0}")]
    CorruptBatch(String),
    /// INVALID_RECORD (87): structurally valid but not acceptable (e.g. non-zero base offset rules).
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// MESSAGE_TOO_LARGE (10): a batch above the topic's max.message.bytes.
    #[error("record batch of {size} bytes exceeds max.message.bytes {max}")]
    MessageTooLarge { size: usize, max: usize },
    /// OUT_OF_ORDER_SEQUENCE_NUMBER (45)
    #[error("out of order sequence for producer {producer_id}: expected {expected}, got {got}")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    /// INVALID_PRODUCER_EPOCH (47) / PRODUCER_FENCED (90)
    #[error("producer {producer_id} epoch {got} is older than current epoch {current}")]
    InvalidProducerEpoch {
        producer_id: i64,
        current: i16,
        got: i16,
    },
    /// OFFSET_OUT_OF_RANGE (1)
    #[error("offset {offset} out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange {
        offset: i64,
        log_start: i64,
        log_end: i64,
    },
    /// UNKNOWN_TOPIC_OR_PARTITION (3)
    #[error("unknown topic or partition {0}")]
    UnknownTopicOrPartition(String),
    /// TOPIC_ALREADY_EXISTS (36)
    #[error("topic {0} already exists")]
    TopicAlreadyExists(String),
    /// INVALID_TOPIC_EXCEPTION (17)
    #[error(transparent)]
    InvalidTopic(#[from] InvalidTopicName),
    /// INVALID_PARTITIONS (37)
    #[error("invalid partitions: {0}")]
    InvalidPartitions(String),
    /// INVALID_CONFIG (40)
    #[error("invalid config: {0}")]
    InvalidConfig(#[from] ConfigError),
    /// OFFSET_OUT_OF_RANGE (1): a follower append whose first batch does not
    /// start at the log end, or whose batches are not contiguous.
    #[error("replica append at offset {got} does not continue the log at {expected}")]
    ReplicaOffsetMismatch { expected: i64, got: i64 },
    /// KAFKA_STORAGE_ERROR (56): the disk failed us; the partition is unusable.
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
}

impl KafkaError for LogError {
    /// Disk errors are logged here, once, because the client only sees
    /// KAFKA_STORAGE_ERROR.
    fn error_code(&self) -> ErrorCode {
        match self {
            LogError::CorruptBatch(_) => ErrorCode::CorruptMessage,
            LogError::InvalidRecord(_) => ErrorCode::InvalidRecord,
            LogError::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            LogError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequenceNumber,
            LogError::InvalidProducerEpoch { .. } => ErrorCode::InvalidProducerEpoch,
            LogError::OffsetOutOfRange { .. } | LogError::ReplicaOffsetMismatch { .. } => {
                ErrorCode::OffsetOutOfRange
            }
            LogError::UnknownTopicOrPartition(_) => ErrorCode::UnknownTopicOrPartition,
            LogError::TopicAlreadyExists(_) => ErrorCode::TopicAlreadyExists,
            LogError::InvalidTopic(_) => ErrorCode::InvalidTopicException,
            LogError::InvalidPartitions(_) => ErrorCode::InvalidPartitions,
            LogError::InvalidConfig(_) => ErrorCode::InvalidConfig,
            LogError::Io(err) => {
                tracing::error!(error = %err, "storage error");
                ErrorCode::KafkaStorageError
            }
        }
    }
}
