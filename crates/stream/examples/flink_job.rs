//! The source article's `FlinkJob`: a source of ten events, printed by a
//! sink. Run with `cargo run -p sluice-stream --example flink_job`.

use sluice_stream::{Source, SourceContext, SourceStatus, StreamEnv};

/// Java's anonymous `SourceFunction<String>`: emits "Event 0" to "Event 9".
struct TenEvents;

impl Source<String> for TenEvents {
    fn poll(&mut self, ctx: &mut SourceContext<'_, String>) -> SourceStatus {
        for i in 0..10 {
            ctx.collect(format!("Event {i}"));
        }
        SourceStatus::Ended
    }
}

fn main() -> Result<(), sluice_stream::StreamError> {
    let env = StreamEnv::new();
    // A SourceFunction is not parallel: one instance.
    let stream = env.add_source("events", 1, |_| TenEvents);
    stream.print();
    env.execute("Flink Job")
}
