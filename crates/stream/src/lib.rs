//! `sluice-stream`: event processing in the Flink mould.
//!
//! A job is a graph of sources, operators and sinks built with
//! [`StreamEnv`] and [`DataStream`], then run with [`StreamEnv::execute`]:
//!
//! ```
//! use sluice_stream::StreamEnv;
//!
//! let env = StreamEnv::new();
//! let words = env
//!     .from_iter(["to be", "or not", "to be"])
//!     .flat_map(|line: &str| line.split(' ').map(str::to_owned).collect::<Vec<_>>())
//!     .map(|word| (word, 1u64))
//!     .key_by(|(word, _)| word.clone())
//!     .reduce(|(word, a), (_, b)| (word, a + b))
//!     .collect();
//! env.execute("word count").unwrap();
//! let mut counts = words.take();
//! counts.sort();
//! // A running count per word: every input record updates its word's.
//! assert_eq!(counts.iter().filter(|(w, _)| w == "be").count(), 2);
//! assert!(counts.contains(&("be".to_owned(), 2)));
//! ```
//!
//! # The dataflow
//!
//! - A **stage** is a chain of operators that run together in one thread
//!   per parallel **subtask** (Flink's operator chaining): records pass from
//!   one operator to the next by a function call, without a queue.
//! - Stages meet at **exchanges** ([`DataStream::key_by`],
//!   [`DataStream::rebalance`]): every upstream subtask sends batches of
//!   records to downstream subtasks over **bounded channels**, so a slow
//!   consumer stops its producers (backpressure) instead of queueing without
//!   limit. A keyed exchange sends every key to one subtask: the key's hash
//!   picks one of [`StreamEnv::set_max_parallelism`] **key groups**, and each
//!   subtask owns a contiguous range of them (Flink's assignment), so keyed
//!   state can later be redistributed to another parallelism a group at a time.
//! - **Event time**: records carry an optional timestamp
//!   ([`Record::time`]); watermarks (the promise that no record older than
//!   them follows) flow with the records. A subtask's watermark is the least
//!   of its inputs' (an input that ended counts as done); the end of a
//!   bounded input is the watermark [`WATERMARK_END`].
//! - User code runs on the subtask's thread. A panic in it fails the job:
//!   its channels close, the other subtasks stop, and `execute` reports the
//!   subtask that failed.

mod async_io;
mod changelog;
pub mod checkpoint;
mod control;
mod env;
mod error;
mod exchange;
mod global;
mod join;
pub mod kafka;
mod keyed;
mod library;
mod metrics;
pub mod nexmark;
mod operator;
mod process;
mod sink;
mod source;
mod stream;
mod watermark;
mod window;

pub use async_io::{AsyncOptions, AsyncOrder};
pub use changelog::KafkaChangelog;
pub use checkpoint::{CheckpointId, CheckpointStore, LocalDirStore, StateReader, StateWriter};
pub use env::StreamEnv;
pub use error::StreamError;
pub use global::{Evictor, GlobalWindowedStream, Trigger};
pub use join::{IntervalJoin, JoinFn};
pub use keyed::{
    key_group_of, key_group_range, subtask_for_key_group, KeyedState, ListState, MapState,
    ValueState,
};
pub use library::LibraryMode;
pub use operator::{Collector, Operator};
pub use process::{KeyedProcess, ProcessContext};
pub use source::{Source, SourceContext, SourceStatus, SubtaskInfo};
pub use stream::{CollectHandle, DataStream, Either, KeyedStream};
pub use watermark::{BoundedOutOfOrderness, WatermarkGenerator, WatermarkOutput};
pub use window::{TimeWindow, WindowedStream, Windows};

/// What keyed state and windows hold, and what checkpoints write:
/// any type serde can encode and decode.
pub trait StateData: serde::Serialize + serde::de::DeserializeOwned {}

impl<T: serde::Serialize + serde::de::DeserializeOwned> StateData for T {}

/// The watermark of an input that ended: every timer and window fires.
pub const WATERMARK_END: i64 = i64::MAX;

/// One element of a stream: a value and its event time (milliseconds since
/// the epoch), when it has one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record<T> {
    pub value: T,
    pub time: Option<i64>,
}

impl<T> Record<T> {
    pub fn new(value: T, time: Option<i64>) -> Record<T> {
        Record { value, time }
    }
}
