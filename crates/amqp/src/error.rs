//! Errors as RabbitMQ gives them: a soft error closes the channel, a hard error the
//! connection, each with a reply code, a text in RabbitMQ's `NAME - detail` form and
//! the class and method that caused it.

use amq_protocol::protocol::{AMQPClass, AMQPErrorKind, AMQPHardError, AMQPSoftError};
use sluice_vocab::{ErrorCode, Refused};

/// A refusal of one method.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{text}")]
pub(crate) struct AmqpError {
    pub kind: AMQPErrorKind,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
    /// The queue's actor stopped under the method (its leadership moved): the
    /// same method against the queue's current leader may well succeed.
    pub retriable: bool,
}

impl AmqpError {
    fn new(kind: AMQPErrorKind, detail: impl AsRef<str>) -> AmqpError {
        let name = match &kind {
            AMQPErrorKind::Soft(s) => match s {
                AMQPSoftError::CONTENTTOOLARGE => "CONTENT_TOO_LARGE",
                AMQPSoftError::NOROUTE => "NO_ROUTE",
                AMQPSoftError::NOCONSUMERS => "NO_CONSUMERS",
                AMQPSoftError::ACCESSREFUSED => "ACCESS_REFUSED",
                AMQPSoftError::NOTFOUND => "NOT_FOUND",
                AMQPSoftError::RESOURCELOCKED => "RESOURCE_LOCKED",
                AMQPSoftError::PRECONDITIONFAILED => "PRECONDITION_FAILED",
            },
            AMQPErrorKind::Hard(h) => match h {
                AMQPHardError::CONNECTIONFORCED => "CONNECTION_FORCED",
                AMQPHardError::INVALIDPATH => "INVALID_PATH",
                AMQPHardError::FRAMEERROR => "FRAME_ERROR",
                AMQPHardError::SYNTAXERROR => "SYNTAX_ERROR",
                AMQPHardError::COMMANDINVALID => "COMMAND_INVALID",
                AMQPHardError::CHANNELERROR => "CHANNEL_ERROR",
                AMQPHardError::UNEXPECTEDFRAME => "UNEXPECTED_FRAME",
                AMQPHardError::RESOURCEERROR => "RESOURCE_ERROR",
                AMQPHardError::NOTALLOWED => "NOT_ALLOWED",
                AMQPHardError::NOTIMPLEMENTED => "NOT_IMPLEMENTED",
                AMQPHardError::INTERNALERROR => "INTERNAL_ERROR",
            },
        };
        let mut text = format!("{name} - {}", detail.as_ref());
        // A reply text is a short string.
        if text.len() > 255 {
            let mut end = 255;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        AmqpError {
            kind,
            text,
            class_id: 0,
            method_id: 0,
            retriable: false,
        }
    }

    pub fn soft(e: AMQPSoftError, detail: impl AsRef<str>) -> AmqpError {
        AmqpError::new(AMQPErrorKind::Soft(e), detail)
    }

    pub fn hard(e: AMQPHardError, detail: impl AsRef<str>) -> AmqpError {
        AmqpError::new(AMQPErrorKind::Hard(e), detail)
    }

    pub fn not_found(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::soft(AMQPSoftError::NOTFOUND, detail)
    }

    pub fn precondition(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::soft(AMQPSoftError::PRECONDITIONFAILED, detail)
    }

    pub fn locked(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::soft(AMQPSoftError::RESOURCELOCKED, detail)
    }

    pub fn access_refused(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::soft(AMQPSoftError::ACCESSREFUSED, detail)
    }

    pub fn unexpected_frame(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::hard(AMQPHardError::UNEXPECTEDFRAME, detail)
    }

    pub fn frame_error(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::hard(AMQPHardError::FRAMEERROR, detail)
    }

    pub fn not_allowed(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::hard(AMQPHardError::NOTALLOWED, detail)
    }

    pub fn command_invalid(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::hard(AMQPHardError::COMMANDINVALID, detail)
    }

    pub fn channel_error(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::hard(AMQPHardError::CHANNELERROR, detail)
    }

    pub fn not_implemented(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::hard(AMQPHardError::NOTIMPLEMENTED, detail)
    }

    pub fn internal(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::hard(AMQPHardError::INTERNALERROR, detail)
    }

    /// A failure of the log or the quorum under a method: the client may retry, so
    /// the channel closes (RabbitMQ's 541 would close the connection over less).
    pub fn unavailable(detail: impl AsRef<str>) -> AmqpError {
        AmqpError::soft(AMQPSoftError::RESOURCELOCKED, detail)
    }

    /// Marks an error the next leader may not repeat (see `retriable`).
    pub fn retriable(mut self) -> AmqpError {
        self.retriable = true;
        self
    }

    /// Names the method that caused the error.
    pub fn on(mut self, method: &AMQPClass) -> AmqpError {
        self.class_id = method.get_amqp_class_id();
        self.method_id = method.get_amqp_method_id();
        self
    }

    /// Whether the error closes the connection (not just the channel).
    pub fn is_hard(&self) -> bool {
        matches!(self.kind, AMQPErrorKind::Hard(_))
    }

    pub fn reply_code(&self) -> u16 {
        self.kind.get_id()
    }

    /// A refusal by the quorum or the log, in AMQP's terms.
    pub fn from_refused(r: &Refused, what: &str) -> AmqpError {
        match r.code {
            ErrorCode::UnknownTopicOrPartition => AmqpError::not_found(what),
            ErrorCode::ResourceNotFound => AmqpError::not_found(&r.message),
            ErrorCode::TopicAlreadyExists => AmqpError::locked(format!(
                "{what}: its topic exists and is not a queue ({})",
                r.message
            )),
            ErrorCode::InvalidTopicException
            | ErrorCode::InvalidConfig
            | ErrorCode::InvalidRequest
            | ErrorCode::InvalidReplicationFactor => {
                AmqpError::precondition(format!("{what}: {}", r.message))
            }
            _ => AmqpError::unavailable(format!("{what}: {}", r.message)),
        }
    }
}
