//! The DataStream API: streams under construction and the operators,
//! exchanges and sinks that extend them.

use std::hash::Hash;
use std::io::Write;
use std::marker::PhantomData;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::env::{Stage, StreamEnv, Task, TaskRuntime};
use crate::exchange::{self, ExchangeSender, Partitioning};
use crate::keyed::{key_group_of, KeyedState};
use crate::operator::{self, BoxOutput, Operator, OperatorLink};
use crate::source::{Generator, IterSource, Source, SubtaskInfo};
use crate::{Record, StreamError};

/// Starts subtask `info` of a stage whose chain so far ends where `out`
/// begins.
type Head<T> = Arc<dyn Fn(SubtaskInfo, BoxOutput<T>) -> Result<Task, StreamError> + Send + Sync>;

/// Gives a record's key.
type KeyFn<T, K> = dyn Fn(&T) -> K + Send + Sync;

/// A stream of `T` under construction: a stage's chain so far. Operators
/// consume it and return the extended stream.
pub struct DataStream<T> {
    env: StreamEnv,
    /// The stage's operators, for thread names and errors.
    name: String,
    parallelism: usize,
    head: Head<T>,
}

/// A stream partitioned by key: every record of a key reaches the same
/// subtask, in the order its upstream subtask sent them.
pub struct KeyedStream<K, T> {
    stream: DataStream<T>,
    key: Arc<KeyFn<T, K>>,
}

/// What a [`DataStream::collect`] sink gathered, once the job ran.
pub struct CollectHandle<T> {
    items: Arc<Mutex<Vec<T>>>,
}

impl<T> CollectHandle<T> {
    /// Takes what was collected: per subtask in arrival order, subtasks
    /// interleaved.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.items.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl StreamEnv {
    /// A source: `make` builds the instance of each of `parallelism`
    /// subtasks (Flink's `addSource`).
    pub fn add_source<T, S, F>(&self, name: &str, parallelism: usize, make: F) -> DataStream<T>
    where
        T: Send + 'static,
        S: Source<T> + 'static,
        F: Fn(SubtaskInfo) -> S + Send + Sync + 'static,
    {
        if self.library().is_some() {
            self.invalid(format!(
                "library mode reads only topic sources: a '{name}' source would start again at every rebalance"
            ));
        }
        self.source_stage(name, parallelism, make)
    }

    /// A source stage, whatever the mode (`add_source` checks the mode).
    fn source_stage<T, S, F>(&self, name: &str, parallelism: usize, make: F) -> DataStream<T>
    where
        T: Send + 'static,
        S: Source<T> + 'static,
        F: Fn(SubtaskInfo) -> S + Send + Sync + 'static,
    {
        let batch = self.with_settings(|s| s.batch);
        let head: Head<T> = Arc::new(move |info, mut out: BoxOutput<T>| {
            let mut source = make(info);
            Ok(Box::new(move |rt: &TaskRuntime| {
                crate::source::run_source(&mut source, rt, &mut out, batch)
            }) as Task)
        });
        DataStream {
            env: self.clone(),
            name: name.to_owned(),
            parallelism: parallelism.max(1),
            head,
        }
    }

    /// The records of a topic, read by the job's parallelism of subtasks
    /// (see [`crate::kafka`]).
    pub fn kafka_source(
        &self,
        source: crate::kafka::KafkaSource,
    ) -> DataStream<crate::kafka::KafkaRecord> {
        let parallelism = self.parallelism();
        let mut source = source;
        if let Some(library) = self.library() {
            if let Err(why) = library.add_source(&source.bootstrap, &source.topic) {
                self.invalid(why);
            }
            if source.bounded {
                self.invalid(format!(
                    "topic '{}': library mode reads topics without end, as Kafka Streams does",
                    source.topic
                ));
            }
            source.library = Some(library);
        }
        self.source_stage("kafka", parallelism, move |info| {
            crate::kafka::KafkaReader::new(source.clone(), info)
        })
    }

    /// The items of `items`, in order, from one subtask (Flink's
    /// `fromCollection`).
    pub fn from_iter<I>(&self, items: I) -> DataStream<I::Item>
    where
        I: IntoIterator,
        I::Item: Send + 'static,
        I::IntoIter: Send + 'static,
    {
        let iter = Mutex::new(Some(items.into_iter()));
        self.add_source("collection", 1, move |_| IterSource {
            iter: iter.lock().ok().and_then(|mut i| i.take()),
            emitted: 0,
        })
    }

    /// `make(n)` for n in 0..count (forever when `count` is None), split
    /// over the job's parallelism: subtask i makes i, i + p, i + 2p, ...
    pub fn generate<T, F>(&self, count: Option<u64>, make: F) -> DataStream<T>
    where
        T: Send + 'static,
        F: Fn(u64) -> T + Send + Sync + 'static,
    {
        let make = Arc::new(make);
        let parallelism = self.parallelism();
        self.add_source("generator", parallelism, move |info| Generator {
            count,
            make: make.clone(),
            next: info.index as u64,
            step: info.parallelism.max(1) as u64,
        })
    }
}

impl<T: Send + 'static> DataStream<T> {
    /// Subtasks of this stream's stage.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// The stage's name so far, for errors.
    pub(crate) fn stage_name(&self) -> String {
        self.name.clone()
    }

    /// A second output of this stage (a side output): each subtask sends
    /// to its own subtask of the returned stream, which runs as a stage of
    /// the same parallelism.
    pub(crate) fn side_output<U: Send + 'static>(
        &self,
        name: &str,
    ) -> (SideOutput<U>, DataStream<U>) {
        let (batch, capacity) = self.env.with_settings(|s| (s.batch, s.channel_batches));
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..self.parallelism)
            .map(|_| sync_channel(capacity))
            .unzip();
        let stream = receiving_stage(&self.env, name, receivers, 1, self.parallelism, None);
        (
            SideOutput {
                stage: name.to_owned(),
                senders,
                batch,
            },
            stream,
        )
    }

    /// Appends a link to the chain.
    pub(crate) fn chain<U: Send + 'static>(
        self,
        name: &str,
        link: impl Fn(SubtaskInfo, BoxOutput<U>) -> BoxOutput<T> + Send + Sync + 'static,
    ) -> DataStream<U> {
        let head = self.head;
        DataStream {
            env: self.env,
            name: format!("{} -> {name}", self.name),
            parallelism: self.parallelism,
            head: Arc::new(move |info, out| head(info, link(info, out))),
        }
    }

    /// Ends the chain in a sink made for each subtask; the stage is complete.
    fn sink(self, name: &str, make: impl Fn(SubtaskInfo) -> BoxOutput<T> + Send + 'static) {
        let head = self.head;
        self.env.add_stage(Stage {
            name: format!("{} -> {name}", self.name),
            parallelism: self.parallelism,
            make: Box::new(move |info| head(info, make(info))),
        });
    }

    pub fn map<U, F>(self, f: F) -> DataStream<U>
    where
        U: Send + 'static,
        F: Fn(T) -> U + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.chain("map", move |_, out| {
            Box::new(operator::Map { f: f.clone(), out })
        })
    }

    pub fn filter<F>(self, f: F) -> DataStream<T>
    where
        F: Fn(&T) -> bool + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.chain("filter", move |_, out| {
            Box::new(operator::Filter { f: f.clone(), out })
        })
    }

    pub fn flat_map<U, I, F>(self, f: F) -> DataStream<U>
    where
        U: Send + 'static,
        I: IntoIterator<Item = U> + 'static,
        F: Fn(T) -> I + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.chain("flat_map", move |_, out| {
            Box::new(operator::FlatMap { f: f.clone(), out })
        })
    }

    /// Calls the async function `f` for each record, with up to
    /// `options.capacity` calls in flight per subtask, and emits what each
    /// returns (none, one or several values, with the record's event time), in
    /// input order or as they complete ([`crate::AsyncOptions`]; Flink's
    /// `AsyncDataStream`). A call that fails or outlasts `options.timeout`
    /// fails the job. A checkpoint's barrier waits for the calls in flight and
    /// follows their results.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sluice_stream::{AsyncOptions, StreamEnv};
    ///
    /// let env = StreamEnv::new();
    /// let looked_up = env
    ///     .from_iter(1..=100u64)
    ///     .async_map(AsyncOptions::ordered(16, Duration::from_secs(5)), |id| async move {
    ///         // A database or service call would be awaited here.
    ///         Ok::<_, std::io::Error>(Some(id * 10))
    ///     })
    ///     .collect();
    /// env.execute("lookup").unwrap();
    /// let mut got = looked_up.take();
    /// got.sort();
    /// assert_eq!(got, (1..=100u64).map(|id| id * 10).collect::<Vec<_>>());
    /// ```
    pub fn async_map<U, I, E, Fut, F>(self, options: crate::AsyncOptions, f: F) -> DataStream<U>
    where
        U: Send + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<I, E>> + Send + 'static,
        I: IntoIterator<Item = U> + 'static,
        E: std::fmt::Display + 'static,
    {
        let f = Arc::new(f);
        let stage = format!("{} -> async", self.name);
        let runtime = self.env.async_runtime();
        let cancel = self.env.cancel_flag();
        self.chain("async", move |info, out| {
            Box::new(crate::async_io::AsyncLink::new(
                f.clone(),
                (runtime.clone(), cancel.clone()),
                options,
                stage.clone(),
                info,
                out,
            ))
        })
    }

    /// Gives records the event time `time_of` extracts and makes watermarks
    /// that trail the largest time seen by `out_of_orderness` (Flink's
    /// `WatermarkStrategy.forBoundedOutOfOrderness`), at the end of every
    /// batch of input.
    pub fn assign_timestamps<F>(self, out_of_orderness: Duration, time_of: F) -> DataStream<T>
    where
        F: Fn(&T) -> i64 + Send + Sync + 'static,
    {
        let generator = crate::BoundedOutOfOrderness::new(out_of_orderness);
        self.assign_timestamps_with(time_of, move |_| generator)
    }

    /// Gives records the event time `time_of` extracts, with watermarks from
    /// a generator of your own (Flink's `WatermarkStrategy.forGenerator`):
    /// punctuated, periodic or both. `make` builds each subtask's instance.
    pub fn assign_timestamps_with<F, G, M>(self, time_of: F, make: M) -> DataStream<T>
    where
        F: Fn(&T) -> i64 + Send + Sync + 'static,
        G: crate::WatermarkGenerator<T> + 'static,
        M: Fn(SubtaskInfo) -> G + Send + Sync + 'static,
    {
        let extract = Arc::new(time_of);
        self.chain("timestamps", move |info, out| {
            Box::new(crate::watermark::Timestamps {
                extract: extract.clone(),
                generator: make(info),
                emitted: i64::MIN,
                out,
            })
        })
    }

    /// A user-defined operator; `make` builds each subtask's instance.
    pub fn process<U, O, F>(self, name: &str, make: F) -> DataStream<U>
    where
        U: Send + 'static,
        O: Operator<T, U> + 'static,
        F: Fn(SubtaskInfo) -> O + Send + Sync + 'static,
    {
        self.chain(name, move |info, out| {
            Box::new(OperatorLink {
                op: make(info),
                out,
                _types: PhantomData,
            })
        })
    }

    /// Ends this stage in an exchange to a new stage of `parallelism`.
    fn exchange(self, name: &str, partitioning: Partitioning<T>, parallelism: usize) -> Self
    where
        T: crate::StateData,
    {
        exchange_from(self, Vec::new(), name, partitioning, parallelism)
    }

    /// This stream's records and `other`'s in one stream, spread over the
    /// job's parallelism as [`Self::rebalance`] does (Flink's `union`).
    pub fn union(self, other: DataStream<T>) -> DataStream<T>
    where
        T: crate::StateData,
    {
        let p = self.env.parallelism();
        exchange_from(self, vec![other], "union", Partitioning::RoundRobin, p)
    }

    /// This stream and `other` as one stream of [`Either`], for an operator
    /// that sees both (Flink's `connect`; key it with
    /// [`Self::key_by`] on a key both sides have for a keyed co-process).
    pub fn connect<U>(self, other: DataStream<U>) -> DataStream<Either<T, U>>
    where
        T: crate::StateData,
        U: Send + crate::StateData + 'static,
    {
        self.map(Either::Left).union(other.map(Either::Right))
    }

    /// Spreads batches over the job's parallelism in turn (Flink's
    /// `rebalance`).
    pub fn rebalance(self) -> DataStream<T>
    where
        T: crate::StateData,
    {
        let p = self.env.parallelism();
        self.exchange("rebalance", Partitioning::RoundRobin, p)
    }

    /// Partitions by the key `key_of` gives, over the job's parallelism.
    pub fn key_by<K, F>(self, key_of: F) -> KeyedStream<K, T>
    where
        T: crate::StateData,
        K: Hash + Eq + Send + 'static,
        F: Fn(&T) -> K + Send + Sync + 'static,
    {
        let (p, max) = self
            .env
            .with_settings(|s| (s.parallelism, s.max_parallelism));
        self.env.keyed_exchange_built();
        let key: Arc<KeyFn<T, K>> = Arc::new(key_of);
        let k = key.clone();
        let group_of: Arc<dyn Fn(&T) -> usize + Send + Sync> =
            Arc::new(move |v: &T| key_group_of(&k(v), max));
        let stream = self.exchange(
            "key_by",
            Partitioning::KeyGroups {
                group_of,
                max_parallelism: max,
            },
            p,
        );
        KeyedStream { stream, key }
    }

    /// Calls `f` for every record, in each subtask.
    pub fn for_each<F>(self, f: F)
    where
        F: Fn(Record<T>) + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.sink("for_each", move |_| {
            let f = f.clone();
            Box::new(operator::ForEach { f: move |r| f(r) })
        });
    }

    /// Gathers every record's value, for tests and small results.
    pub fn collect(self) -> CollectHandle<T> {
        let items = Arc::new(Mutex::new(Vec::new()));
        let into = items.clone();
        self.sink("collect", move |_| {
            let into = into.clone();
            Box::new(operator::ForEach {
                f: move |r: Record<T>| into.lock().unwrap_or_else(|p| p.into_inner()).push(r.value),
            })
        });
        CollectHandle { items }
    }

    /// Writes every value, one per line, to files in `dir`, exactly once
    /// when the job checkpoints: a file is committed (made visible under
    /// its final name, `part-...`) when the checkpoint that closed it
    /// completes, or when the job succeeds (see the sink's module).
    pub fn write_files(self, dir: impl Into<std::path::PathBuf>)
    where
        T: std::fmt::Display,
    {
        let dir = dir.into();
        if self.env.library().is_some() {
            // Its commits follow checkpoints a library-mode instance does
            // not keep.
            self.env
                .invalid("library mode writes only to topics: write_files is refused".into());
        }
        let commits = self.env.success_commits();
        self.sink("files", move |info| {
            Box::new(crate::sink::FileSink::new(
                dir.clone(),
                info,
                commits.clone(),
            ))
        });
    }

    /// Writes every value to a topic as the record `serialize` makes of it,
    /// at least or exactly once (see [`crate::kafka`]).
    pub fn sink_to_kafka<F>(self, sink: crate::kafka::KafkaSink, serialize: F)
    where
        F: Fn(&T) -> crate::kafka::KafkaOutput + Send + Sync + 'static,
    {
        let serialize: Arc<crate::kafka::Serializer<T>> = Arc::new(serialize);
        if let Some(library) = self.env.library() {
            // In the instance's transaction, with the group's positions
            // (so at least once is exactly once there).
            if let Err(why) = library.check_sink(&sink.bootstrap, &sink.topic) {
                self.env.invalid(why);
            }
            let (topic, cancel) = (sink.topic.clone(), self.env.cancel_flag());
            self.sink("kafka", move |info| {
                Box::new(library.writer(&topic, serialize.clone(), info, cancel.clone()))
            });
            return;
        }
        let commits = self.env.success_commits();
        self.sink("kafka", move |info| {
            Box::new(crate::kafka::KafkaWriter::new(
                sink.clone(),
                serialize.clone(),
                info,
                commits.clone(),
            ))
        });
    }

    /// Writes every value to standard output, one per line; prefixed with
    /// the subtask's number (from 1) when the stage runs in parallel.
    pub fn print(self)
    where
        T: std::fmt::Display,
    {
        self.print_to(Arc::new(Mutex::new(std::io::stdout())));
    }

    /// As [`Self::print`], to `to`.
    pub fn print_to<W: Write + Send + 'static>(self, to: Arc<Mutex<W>>)
    where
        T: std::fmt::Display,
    {
        self.sink("print", move |info| {
            let prefix = if info.parallelism > 1 {
                format!("{}> ", info.index + 1)
            } else {
                String::new()
            };
            Box::new(operator::Print {
                prefix,
                to: to.clone(),
                line: Vec::new(),
            })
        });
    }
}

/// Ends `first` and the `rest` in an exchange to one new stage of
/// `parallelism`: the inputs of its subtasks are the upstream subtasks of
/// all of them, numbered in order.
fn exchange_from<T: Send + crate::StateData + 'static>(
    first: DataStream<T>,
    rest: Vec<DataStream<T>>,
    name: &str,
    partitioning: Partitioning<T>,
    parallelism: usize,
) -> DataStream<T> {
    let env = first.env.clone();
    let mut upstream = vec![first];
    upstream.extend(rest);
    let (batch, capacity) = env.with_settings(|s| (s.batch, s.channel_batches));
    let inputs: usize = upstream.iter().map(|s| s.parallelism).sum();
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..parallelism).map(|_| sync_channel(capacity)).unzip();
    let codec = exchange::ChannelCodec::new(match &partitioning {
        Partitioning::KeyGroups { group_of, .. } => Some(group_of.clone()),
        Partitioning::RoundRobin => None,
    });
    let mut first_input = 0;
    for stream in upstream {
        let offset = first_input;
        first_input += stream.parallelism;
        let stage = stream.name.clone();
        let senders = senders.clone();
        let partitioning = partitioning.clone();
        stream.sink(name, move |info| {
            Box::new(ExchangeSender {
                stage: stage.clone(),
                me: offset + info.index,
                targets: senders.clone(),
                partitioning: partitioning.clone(),
                buffers: (0..parallelism)
                    .map(|_| Vec::with_capacity(batch))
                    .collect(),
                batch,
                next: (offset + info.index) % parallelism,
            })
        });
    }
    receiving_stage(&env, name, receivers, inputs, parallelism, Some(codec))
}

/// Subtask `i` of `a` and of `b` (of equal parallelism) feed subtask `i`
/// of a new stage: its inputs are `a`'s (0) and `b`'s (1). Both are keyed
/// alike, by the key group `group_of` gives.
fn pointwise_union<T: Send + crate::StateData + 'static>(
    a: DataStream<T>,
    b: DataStream<T>,
    name: &str,
    group_of: exchange::GroupOf<T>,
) -> DataStream<T> {
    let env = a.env.clone();
    let parallelism = a.parallelism;
    let (batch, capacity) = env.with_settings(|s| (s.batch, s.channel_batches));
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..parallelism).map(|_| sync_channel(capacity)).unzip();
    for (input, stream) in [a, b].into_iter().enumerate() {
        let stage = stream.name.clone();
        let senders = senders.clone();
        stream.sink(name, move |info| {
            Box::new(ExchangeSender {
                stage: stage.clone(),
                me: input,
                targets: senders.get(info.index).cloned().into_iter().collect(),
                partitioning: Partitioning::RoundRobin,
                buffers: vec![Vec::with_capacity(batch)],
                batch,
                next: 0,
            })
        });
    }
    receiving_stage(
        &env,
        name,
        receivers,
        2,
        parallelism,
        Some(exchange::ChannelCodec::new(Some(group_of))),
    )
}

/// One of two streams' values ([`DataStream::connect`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Either<L, R> {
    Left(L),
    Right(R),
}

/// A stage that starts where `receivers` (one per subtask) deliver what
/// `upstream` subtasks each send; `codec` lets it take unaligned
/// checkpoints.
fn receiving_stage<T: Send + 'static>(
    env: &StreamEnv,
    name: &str,
    receivers: Vec<Receiver<exchange::Envelope<T>>>,
    upstream: usize,
    parallelism: usize,
    codec: Option<Arc<exchange::ChannelCodec<T>>>,
) -> DataStream<T> {
    let receivers: Arc<exchange::Inputs<T>> =
        Arc::new(Mutex::new(receivers.into_iter().map(Some).collect()));
    env.add_inputs(name, receivers.clone());
    let stage = name.to_owned();
    let head: Head<T> =
        Arc::new(move |info, out| {
            let rx = receivers
                .lock()
                .ok()
                .and_then(|mut r| r.get_mut(info.index).and_then(Option::take))
                .ok_or_else(|| StreamError::InvalidJob(format!("stage '{stage}' started twice")))?;
            let stage = stage.clone();
            let codec = codec.clone();
            Ok(Box::new(move |rt: &TaskRuntime| {
                exchange::receive(&stage, rt, rx, upstream, codec, out)
            }) as Task)
        });
    DataStream {
        env: env.clone(),
        name: name.to_owned(),
        parallelism,
        head,
    }
}

/// The sending side of a side output: subtask `i` sends to subtask `i` of
/// the side stream.
pub(crate) struct SideOutput<T> {
    stage: String,
    senders: Vec<std::sync::mpsc::SyncSender<exchange::Envelope<T>>>,
    batch: usize,
}

impl<T: Send + 'static> SideOutput<T> {
    pub(crate) fn output(&self, info: SubtaskInfo) -> BoxOutput<T> {
        Box::new(ExchangeSender {
            stage: self.stage.clone(),
            // The only input of the receiving subtask.
            me: 0,
            targets: self.senders.get(info.index).cloned().into_iter().collect(),
            partitioning: Partitioning::RoundRobin,
            buffers: vec![Vec::with_capacity(self.batch)],
            batch: self.batch,
            next: 0,
        })
    }
}

impl<T> Clone for Partitioning<T> {
    fn clone(&self) -> Self {
        match self {
            Partitioning::RoundRobin => Partitioning::RoundRobin,
            Partitioning::KeyGroups {
                group_of,
                max_parallelism,
            } => Partitioning::KeyGroups {
                group_of: group_of.clone(),
                max_parallelism: *max_parallelism,
            },
        }
    }
}

impl<K, T> KeyedStream<K, T>
where
    K: Hash + Eq + Send + 'static,
    T: Send + 'static,
{
    /// Folds each record into its key's value with `f` and emits the new
    /// value (Flink's rolling `reduce`).
    pub fn reduce<F>(self, f: F) -> DataStream<T>
    where
        K: crate::StateData,
        T: Clone + crate::StateData,
        F: Fn(T, T) -> T + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let key = self.key;
        self.stream.chain("reduce", move |info, out| {
            Box::new(operator::Reduce {
                key: key.clone(),
                f: f.clone(),
                state: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
                out,
            })
        })
    }

    /// A keyed process function with event-time timers (Flink's
    /// `KeyedProcessFunction`); `make` builds each subtask's instance,
    /// with any keyed state it keeps ([`KeyedState`] for the subtask).
    pub fn process<U, P, F>(self, name: &str, make: F) -> DataStream<U>
    where
        K: Clone + crate::StateData,
        U: Send + 'static,
        P: crate::KeyedProcess<K, T, U> + 'static,
        F: Fn(SubtaskInfo) -> P + Send + Sync + 'static,
    {
        let key = self.key;
        self.stream.chain(name, move |info, out| {
            Box::new(crate::process::KeyedProcessLink::new(
                key.clone(),
                make(info),
                out,
            ))
        })
    }

    /// One window per key for all time, fired by a trigger you set
    /// ([`crate::Trigger`]; none fires by default) and trimmed by an optional
    /// [`crate::Evictor`] (Flink's `GlobalWindows`).
    pub fn global_window(self) -> crate::GlobalWindowedStream<K, T>
    where
        K: Clone + crate::StateData,
        T: Clone + crate::StateData,
    {
        crate::GlobalWindowedStream {
            stream: self.stream,
            key: self.key,
            trigger: crate::Trigger::never(),
            evictor: None,
        }
    }

    /// Each key's records in windows of `size`, by arrival: the window fires
    /// on its `size`-th record and starts again empty (Flink's
    /// `countWindow(size)`).
    pub fn count_window(self, size: u64) -> crate::GlobalWindowedStream<K, T>
    where
        K: Clone + crate::StateData,
        T: Clone + crate::StateData,
    {
        self.global_window()
            .trigger(crate::Trigger::count(size).purging())
    }

    /// Each key's last `size` records, fired every `slide` records (Flink's
    /// `countWindow(size, slide)`).
    pub fn count_window_sliding(self, size: u64, slide: u64) -> crate::GlobalWindowedStream<K, T>
    where
        K: Clone + crate::StateData,
        T: Clone + crate::StateData,
    {
        self.global_window()
            .trigger(crate::Trigger::count(slide))
            .evictor(crate::Evictor::count(
                usize::try_from(size).unwrap_or(usize::MAX),
            ))
    }

    /// Cuts each key's records into event-time windows.
    pub fn window(self, windows: crate::Windows) -> crate::WindowedStream<K, T>
    where
        K: Clone + crate::StateData,
        T: Clone + crate::StateData,
    {
        crate::WindowedStream {
            stream: self.stream,
            key: self.key,
            windows,
            lateness: 0,
            late: None,
        }
    }

    /// Both streams' records as one keyed stream of [`Either`]: the two
    /// are keyed alike, so subtask `i` of each feeds subtask `i` (when
    /// their parallelism differs, they are keyed again).
    fn pair<U>(self, other: KeyedStream<K, U>) -> KeyedStream<K, Either<T, U>>
    where
        T: crate::StateData,
        U: Send + crate::StateData + 'static,
    {
        let (ka, kb) = (self.key, other.key);
        let key: Arc<KeyFn<Either<T, U>, K>> = Arc::new(move |e| match e {
            Either::Left(t) => ka(t),
            Either::Right(u) => kb(u),
        });
        let left = self.stream.map(Either::Left);
        let right = other.stream.map(Either::Right);
        let max = left.env.with_settings(|s| s.max_parallelism);
        let k = key.clone();
        let group_of: exchange::GroupOf<Either<T, U>> = Arc::new(move |v| key_group_of(&k(v), max));
        let stream = if left.parallelism == right.parallelism {
            pointwise_union(left, right, "join", group_of)
        } else {
            let p = left.env.parallelism();
            exchange_from(
                left,
                vec![right],
                "join",
                Partitioning::KeyGroups {
                    group_of,
                    max_parallelism: max,
                },
                p,
            )
        };
        KeyedStream { stream, key }
    }

    /// Flink's interval join: a record of this stream at `tl` and one of
    /// `other` at `tr` with the same key give `join(key, left, right)` when
    /// `tl + lower_ms <= tr <= tl + upper_ms` (see [`crate::IntervalJoin`]).
    pub fn interval_join<U, O, F>(
        self,
        other: KeyedStream<K, U>,
        lower_ms: i64,
        upper_ms: i64,
        join: F,
    ) -> DataStream<O>
    where
        K: Clone + crate::StateData,
        T: crate::StateData,
        U: Send + crate::StateData + 'static,
        O: Send + 'static,
        F: Fn(&K, &T, &U) -> O + Send + Sync + 'static,
    {
        if lower_ms > upper_ms {
            self.stream.env.invalid(format!(
                "interval join bounds: lower {lower_ms} ms is above upper {upper_ms} ms"
            ));
        }
        let join: Arc<crate::JoinFn<K, T, U, O>> = Arc::new(join);
        self.pair(other).process("interval join", move |info| {
            crate::IntervalJoin::new(info, lower_ms, upper_ms, join.clone())
        })
    }

    /// Flink's window join: every pair of records of this stream and
    /// `other` with the same key in the same window gives
    /// `join(key, window, left, right)` when the window fires.
    pub fn window_join<U, O, F>(
        self,
        other: KeyedStream<K, U>,
        windows: crate::Windows,
        join: F,
    ) -> DataStream<O>
    where
        K: Clone + crate::StateData,
        T: Clone + crate::StateData,
        U: Clone + Send + crate::StateData + 'static,
        O: Send + 'static,
        F: Fn(&K, &crate::TimeWindow, &T, &U) -> O + Send + Sync + 'static,
    {
        let join: Arc<crate::join::WindowJoinFn<K, T, U, O>> = Arc::new(join);
        self.pair(other)
            .window(windows)
            .process(move |k, w, all| crate::join::window_pairs(k, w, all, &*join))
    }

    /// The key of a record, as this stream partitions by.
    pub fn key_of(&self, value: &T) -> K {
        (self.key)(value)
    }

    /// The stream itself, for operators that do not need the key.
    pub fn into_stream(self) -> DataStream<T> {
        self.stream
    }
}
