//! The Nexmark benchmark's events as a parallel source: the `nexmark`
//! crate's generator (its default configuration is the Beam and Flink
//! suites'), with event times and watermarks 4 s behind the latest time, as
//! the Flink suite declares them.

pub use nexmark::EventGenerator;

pub use nexmark::config::NexmarkConfig;
pub use nexmark::event::{Auction, Bid, Event, Person};

use crate::{
    DataStream, Source, SourceContext, SourceStatus, StateReader, StateWriter, StreamEnv,
    StreamError,
};

/// How far watermarks trail the latest event time (Flink's Nexmark DDL:
/// `WATERMARK FOR dateTime AS dateTime - INTERVAL '4' SECOND`).
pub const NEXMARK_OUT_OF_ORDERNESS_MS: i64 = 4_000;

/// Events between two watermarks of a source subtask.
const WATERMARK_EVERY: u64 = 1024;

struct NexmarkSource {
    generator: EventGenerator,
    events: u64,
    /// The latest event time emitted, which the watermarks trail.
    latest: i64,
    since_watermark: u64,
    config: NexmarkConfig,
    step: u64,
}

impl Source<Event> for NexmarkSource {
    fn poll(&mut self, ctx: &mut SourceContext<'_, Event>) -> SourceStatus {
        for _ in 0..WATERMARK_EVERY {
            if self.generator.offset() >= self.events {
                return SourceStatus::Ended;
            }
            let Some(event) = self.generator.next() else {
                return SourceStatus::Ended;
            };
            let time = i64::try_from(event.timestamp()).unwrap_or(i64::MAX);
            self.latest = self.latest.max(time);
            ctx.collect_at(event, time);
            self.since_watermark += 1;
            if self.since_watermark == WATERMARK_EVERY {
                self.since_watermark = 0;
                ctx.emit_watermark(self.latest - NEXMARK_OUT_OF_ORDERNESS_MS);
            }
        }
        SourceStatus::More
    }

    fn snapshot(&mut self, state: &mut StateWriter) {
        state.value("offset", &self.generator.offset());
    }

    // Positions are per subtask of one parallelism: it cannot change.
    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        if let Some(offset) = state.own::<u64>("offset")? {
            self.generator = EventGenerator::new(self.config.clone())
                .with_offset(offset)
                .with_step(self.step);
        }
        Ok(())
    }
}

impl StreamEnv {
    /// The first `events` Nexmark events of `config`, split over the job's
    /// parallelism (subtask i of p makes events i, i + p, ...), with event
    /// times and watermarks.
    pub fn nexmark(&self, events: u64, config: NexmarkConfig) -> DataStream<Event> {
        let parallelism = self.parallelism();
        self.add_source("nexmark", parallelism, move |info| {
            let step = info.parallelism.max(1) as u64;
            NexmarkSource {
                generator: EventGenerator::new(config.clone())
                    .with_offset(info.index as u64)
                    .with_step(step),
                events,
                latest: i64::MIN,
                since_watermark: 0,
                config: config.clone(),
                step,
            }
        })
    }
}
