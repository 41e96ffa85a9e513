//! The client side of the Kafka wire protocol, shared by replication, the
//! load generator and the test harness. Message bodies and headers are
//! encoded and decoded by `kafka-protocol`; this crate owns what lies
//! around them.
//!
//! # Framing
//!
//! Every request and response travels as one frame: a big-endian `i32`
//! size followed by that many bytes. A request frame holds a request header
//! (API key, version, correlation id, client id) and the body; a response
//! frame holds a response header (the correlation id) and the body.
//! [`encode_request`] appends a whole request frame to a caller's buffer and
//! [`decode_response`] decodes a response frame that [`read_frame`] read.
//!
//! # The size cap
//!
//! A frame's size comes from the peer, so [`read_frame`] checks it against a
//! cap ([`MAX_FRAME`] on a [`Connection`]) before it reserves a byte: a
//! lying or corrupt prefix costs an error, not a 2 GiB allocation. Frames
//! are read into a caller-owned buffer that is reused once the previous
//! frame has been dropped, so a stream of large fetch answers does not
//! allocate (and fault in) fresh memory for each.
//!
//! # Version negotiation
//!
//! [`Connection::connect`] starts with ApiVersions (v2, which every broker
//! since Kafka 2.0 serves) and keeps the broker's table as [`Versions`].
//! [`Versions::pick`] then chooses, per API, the highest version both sides
//! speak, or fails with [`ClientError::Unsupported`] when the broker's range
//! does not meet the caller's.
//!
//! # Pipelining
//!
//! A broker answers the requests of one connection in the order they were
//! sent. [`Connection::call`] sends one request and waits for its answer;
//! [`Connection::into_split`] hands out a [`WriteHalf`] that encodes and
//! sends requests with increasing correlation ids and a [`ReadHalf`] that
//! reads their answers in the same order, so a writer can keep several
//! requests in flight while another task takes the answers. The correlation
//! id is only checked, never looked up: an answer out of order is a
//! protocol error. Requests that get no answer (Produce with acks=0) must
//! not be waited for.
//!
//! # Raw access
//!
//! The free functions work on any `AsyncRead` and on plain buffers, so a
//! test can build frames, send deliberately malformed bytes over its own
//! socket and still read and decode the answers with the same code.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), sluice_client::ClientError> {
//! use std::time::Duration;
//!
//! use kafka_protocol::messages::{ApiKey, MetadataRequest};
//! use sluice_client::Connection;
//!
//! let mut conn = Connection::connect("127.0.0.1:9092", "my-tool", Duration::from_secs(10)).await?;
//! let version = conn.versions().pick(ApiKey::Metadata, 1, 12)?;
//! let metadata = conn.call(&MetadataRequest::default(), version).await?;
//! println!("{} brokers", metadata.brokers.len());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod connection;
mod error;
mod frame;
pub mod http;
pub mod txn;
mod versions;

pub use connection::{Connection, ReadHalf, WriteHalf};
pub use error::{ClientError, ProtocolError};
pub use frame::{decode_response, encode_request, read_frame, MAX_FRAME};
pub use versions::{VersionRange, Versions};
