//! Topic names: Kafka's one rule.

use crate::{ErrorCode, KafkaError};

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// A topic name that follows Kafka's rule: 1..=249 characters of `[a-zA-Z0-9._-]`,
/// neither `.` nor `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicName(String);

/// A name that breaks the rule, and which part of it. INVALID_TOPIC_EXCEPTION.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic name {name:?}: {reason}")]
pub struct InvalidTopicName {
    pub name: String,
    pub reason: &'static str,
}

impl KafkaError for InvalidTopicName {
    fn error_code(&self) -> ErrorCode {
        ErrorCode::InvalidTopicException
    }
}

impl TopicName {
    /// Checks `name` against the rule.
    pub fn new(name: &str) -> Result<TopicName, InvalidTopicName> {
        TopicName::validate(name)?;
        Ok(TopicName(name.to_owned()))
    }

    /// The rule alone, for names that stay `&str`.
    pub fn validate(name: &str) -> Result<(), InvalidTopicName> {
        let invalid = |reason| {
            Err(InvalidTopicName {
                // A hostile name can be long: keep what is reported bounded.
                name: name.chars().take(MAX_TOPIC_NAME_LEN + 1).collect(),
                reason,
            })
        };
        if name.is_empty() {
            return invalid("the name is empty");
        }
        if name == "." || name == ".." {
            return invalid("the name cannot be . or ..");
        }
        if name.len() > MAX_TOPIC_NAME_LEN {
            return invalid("the name is longer than 249 characters");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return invalid("the name may only contain ASCII letters, digits, '.', '_' and '-'");
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the broker owns this topic ([`crate::internal::is_internal`]).
    pub fn is_internal(&self) -> bool {
        crate::internal::is_internal(&self.0)
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafkas_rule() {
        assert!(TopicName::new("orders.v1_x-y").is_ok());
        assert!(TopicName::new(&"a".repeat(249)).is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "ü"] {
            let e = TopicName::new(bad).unwrap_err();
            assert_eq!(e.error_code(), ErrorCode::InvalidTopicException, "{bad:?}");
        }
        let long = TopicName::new(&"a".repeat(10_000)).unwrap_err();
        assert_eq!(long.name.len(), 250, "reported names stay bounded");
        assert!(TopicName::new("__consumer_offsets").is_ok_and(|n| n.is_internal()));
    }
}
