//! The Nexmark benchmark's events as a parallel source: the `nexmark`
//! crate's generator (its default configuration is the Beam and Flink
//! suites'), with event times and watermarks 4 s behind the latest time, as
//! the Flink suite declares them.

pub use nexmark::EventGenerator;

pub use nexmark::config::NexmarkConfig;
pub use nexmark::event::{Auction, Bid, Event, Person};

use crate::{DataStream, Source, SourceContext, StreamEnv};

/// How far watermarks trail the latest event time (Flink's Nexmark DDL:
/// `WATERMARK FOR dateTime AS dateTime - INTERVAL '4' SECOND`).
pub const NEXMARK_OUT_OF_ORDERNESS_MS: i64 = 4_000;

/// Events between two watermarks of a source subtask.
const WATERMARK_EVERY: u64 = 1024;

struct NexmarkSource {
    generator: EventGenerator,
    events: u64,
}

impl Source<Event> for NexmarkSource {
    fn run(&mut self, ctx: &mut SourceContext<'_, Event>) {
        let mut latest = i64::MIN;
        let mut since_watermark = 0;
        while self.generator.offset() < self.events && !ctx.is_cancelled() {
            let Some(event) = self.generator.next() else {
                return;
            };
            let time = i64::try_from(event.timestamp()).unwrap_or(i64::MAX);
            latest = latest.max(time);
            ctx.collect_at(event, time);
            since_watermark += 1;
            if since_watermark == WATERMARK_EVERY {
                since_watermark = 0;
                ctx.emit_watermark(latest - NEXMARK_OUT_OF_ORDERNESS_MS);
            }
        }
    }
}

impl StreamEnv {
    /// The first `events` Nexmark events of `config`, split over the job's
    /// parallelism (subtask i of p makes events i, i + p, ...), with event
    /// times and watermarks.
    pub fn nexmark(&self, events: u64, config: NexmarkConfig) -> DataStream<Event> {
        let parallelism = self.parallelism();
        self.add_source("nexmark", parallelism, move |info| NexmarkSource {
            generator: EventGenerator::new(config.clone())
                .with_offset(info.index as u64)
                .with_step(info.parallelism.max(1) as u64),
            events,
        })
    }
}
