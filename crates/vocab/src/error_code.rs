//! What goes with [`ErrorCode`]: display, errors that name a code, refusals with a
//! message.

use crate::ErrorCode;

impl ErrorCode {
    /// The wire number of a result: 0 for success.
    pub const fn of(result: Result<(), ErrorCode>) -> i16 {
        match result {
            Ok(()) => 0,
            Err(e) => e.code(),
        }
    }

    /// A wire number read off a response: `Ok` for 0, the code otherwise
    /// (UNKNOWN_SERVER_ERROR for a number Kafka has not defined).
    pub const fn check(code: i16) -> Result<(), ErrorCode> {
        if code == 0 {
            return Ok(());
        }
        match ErrorCode::from_code(code) {
            Some(e) => Err(e),
            None => Err(ErrorCode::UnknownServerError),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

impl std::error::Error for ErrorCode {}

/// An error that a Kafka client sees as one error code.
pub trait KafkaError: std::error::Error {
    /// The code the client is answered with.
    fn error_code(&self) -> ErrorCode;
}

impl KafkaError for ErrorCode {
    fn error_code(&self) -> ErrorCode {
        *self
    }
}

/// A refusal: the code a client gets and the message that explains it (Kafka's
/// `error_message` fields; logged where no such field exists).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

impl Refused {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refused {
        Refused {
            code,
            message: message.into(),
        }
    }

    /// The code and the error's own text.
    pub fn from_error<E: KafkaError + ?Sized>(e: &E) -> Refused {
        Refused::new(e.error_code(), e.to_string())
    }
}

impl KafkaError for Refused {
    fn error_code(&self) -> ErrorCode {
        self.code
    }
}

impl From<ErrorCode> for Refused {
    fn from(code: ErrorCode) -> Refused {
        Refused::new(code, code.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_names_and_flags_match_kafka() {
        assert_eq!(ErrorCode::NotLeaderOrFollower.code(), 6);
        assert_eq!(
            ErrorCode::NotLeaderOrFollower.name(),
            "NOT_LEADER_OR_FOLLOWER"
        );
        assert!(ErrorCode::NotLeaderOrFollower.is_retriable());
        // The replication layer once spelled this 79 (MEMBER_ID_REQUIRED).
        assert_eq!(ErrorCode::UnknownLeaderEpoch.code(), 75);
        assert_eq!(ErrorCode::MemberIdRequired.code(), 79);
        assert_eq!(ErrorCode::FencedLeaderEpoch.code(), 74);
        assert_eq!(ErrorCode::UnknownServerError.code(), -1);
        assert!(!ErrorCode::TopicAlreadyExists.is_retriable());
        assert_eq!(
            ErrorCode::InvalidTopicException.name(),
            "INVALID_TOPIC_EXCEPTION"
        );
    }

    #[test]
    fn every_code_round_trips_and_numbers_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for &e in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(e.code()), Some(e));
            assert!(seen.insert(e.code()), "{e} twice");
            assert_ne!(e.code(), 0);
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(30_000), None);
    }

    #[test]
    fn wire_numbers_of_results() {
        assert_eq!(ErrorCode::of(Ok(())), 0);
        assert_eq!(ErrorCode::of(Err(ErrorCode::RequestTimedOut)), 7);
        assert_eq!(ErrorCode::check(0), Ok(()));
        assert_eq!(ErrorCode::check(19), Err(ErrorCode::NotEnoughReplicas));
        assert_eq!(ErrorCode::check(12_345), Err(ErrorCode::UnknownServerError));
        let r = Refused::new(ErrorCode::InvalidConfig, "segment.bytes too small");
        assert_eq!(
            r.to_string(),
            "INVALID_CONFIG (40): segment.bytes too small"
        );
    }
}
