use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use sluice_vocab::ErrorCode;

use crate::VersionRange;

/// Why a client operation failed.
///
/// The variants separate what a caller reacts to differently: an
/// unreachable broker, a broken or silent connection (reconnect), a peer
/// that does not speak the protocol as expected, and a broker that speaks
/// it but not in a version the caller can use.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// Reading or writing failed, or the connection is no longer usable.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Connecting or an answer took longer than allowed.
    #[error("{what}: no answer within {limit:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The time allowed.
        limit: Duration,
    },
    /// The bytes exchanged do not follow the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The broker does not serve `api` in any version this client speaks.
    #[error("{api:?}: {}, this client speaks {ours}", broker_serves(.broker))]
    Unsupported {
        /// The API asked for.
        api: ApiKey,
        /// The broker's range, None when it does not serve the API at all.
        broker: Option<VersionRange>,
        /// The versions the caller can use.
        ours: VersionRange,
    },
    /// The broker answered the ApiVersions handshake with an error.
    #[error("the broker answered ApiVersions with {0}")]
    Handshake(ErrorCode),
    /// The broker refused a request, or kept answering with a retriable
    /// error past the retry limit.
    #[error("{what}: the broker answered {code}")]
    Broker {
        /// The request.
        what: &'static str,
        /// Its error code.
        code: ErrorCode,
    },
}

/// How the bytes received (or about to be sent) break the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A frame's size prefix is negative or above the cap.
    #[error("frame of {size} bytes (at most {max} accepted)")]
    FrameSize {
        /// The size the prefix declared.
        size: i32,
        /// The cap it was checked against.
        max: usize,
    },
    /// A request could not be encoded (a field out of range for `version`,
    /// or a frame above 2 GiB).
    #[error("encoding {} v{version}: {reason}", api_name(*.api))]
    Encode {
        /// The request's API key.
        api: i16,
        /// The version it was encoded at.
        version: i16,
        /// What the encoder said.
        reason: String,
    },
    /// A response could not be decoded, or left bytes over.
    #[error("decoding a response to {} v{version}: {reason}", api_name(*.api))]
    Decode {
        /// The request's API key.
        api: i16,
        /// The version it was decoded at.
        version: i16,
        /// What the decoder said.
        reason: String,
    },
    /// An HTTP answer of the admin API is malformed.
    #[error("HTTP: {0}")]
    Http(String),
    /// An answer arrived for another request than the oldest outstanding.
    #[error("correlation id {got} in answer to {expected}")]
    CorrelationId {
        /// The id of the request waited for.
        expected: i32,
        /// The id the answer carried.
        got: i32,
    },
}

fn broker_serves(range: &Option<VersionRange>) -> String {
    match range {
        Some(r) => format!("the broker serves {r}"),
        None => "the broker does not serve it".to_owned(),
    }
}

/// The API's name when `kafka-protocol` knows the key, its number otherwise.
pub(crate) fn api_name(key: i16) -> String {
    match ApiKey::try_from(key) {
        Ok(api) => format!("{api:?}"),
        Err(()) => format!("api key {key}"),
    }
}
