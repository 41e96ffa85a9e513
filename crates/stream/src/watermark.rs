//! Event time from the records: timestamps and the watermarks that follow
//! them (Flink's `WatermarkStrategy`: a timestamp assigner and a
//! `WatermarkGenerator`).

use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::{CheckpointId, Cursor};
use crate::operator::{BoxOutput, Output};
use crate::{Record, StreamError, WATERMARK_END};

/// Decides how far event time has got, from the records seen (Flink's
/// `WatermarkGenerator`). One instance runs in each subtask. Watermarks it
/// emits that do not rise are ignored, so it need not track what it sent.
pub trait WatermarkGenerator<T>: Send {
    /// Each record, with the event time it was given: a punctuated
    /// generator emits here (the watermark follows the record).
    fn on_event(&mut self, record: &T, time: i64, output: &mut WatermarkOutput);

    /// At the end of every input batch: a periodic generator emits here.
    fn on_periodic_emit(&mut self, output: &mut WatermarkOutput) {
        let _ = output;
    }
}

/// Where a [`WatermarkGenerator`] emits.
#[derive(Debug, Default)]
pub struct WatermarkOutput {
    emitted: Option<i64>,
}

impl WatermarkOutput {
    /// No record with an event time at or below `watermark` is expected
    /// any more.
    pub fn emit_watermark(&mut self, watermark: i64) {
        self.emitted = Some(self.emitted.map_or(watermark, |w| w.max(watermark)));
    }
}

/// Watermarks that trail the largest event time seen by a fixed bound
/// (Flink's `forBoundedOutOfOrderness`): the largest time less the bound
/// less 1 ms, at the end of every input batch.
#[derive(Clone, Copy, Debug)]
pub struct BoundedOutOfOrderness {
    bound_ms: i64,
    max_time: i64,
}

impl BoundedOutOfOrderness {
    pub fn new(bound: Duration) -> BoundedOutOfOrderness {
        BoundedOutOfOrderness {
            bound_ms: i64::try_from(bound.as_millis()).unwrap_or(i64::MAX),
            max_time: i64::MIN,
        }
    }
}

impl<T> WatermarkGenerator<T> for BoundedOutOfOrderness {
    fn on_event(&mut self, _: &T, time: i64, _: &mut WatermarkOutput) {
        self.max_time = self.max_time.max(time);
    }

    fn on_periodic_emit(&mut self, output: &mut WatermarkOutput) {
        if self.max_time > i64::MIN {
            output.emit_watermark(
                self.max_time
                    .saturating_sub(self.bound_ms)
                    .saturating_sub(1),
            );
        }
    }
}

/// The link that stamps records and passes the generator's watermarks on.
pub(crate) struct Timestamps<F, G, T> {
    pub extract: Arc<F>,
    pub generator: G,
    pub emitted: i64,
    pub out: BoxOutput<T>,
}

impl<F, G, T> Timestamps<F, G, T> {
    fn pass_on(&mut self, output: WatermarkOutput) -> Result<(), StreamError> {
        match output.emitted {
            Some(w) if w > self.emitted => {
                self.emitted = w;
                // The stage's watermark from here on is the generator's.
                crate::metrics::with_current(|m| m.set_watermark(w));
                self.out.watermark(w)
            }
            _ => Ok(()),
        }
    }
}

impl<T, F, G> Output<T> for Timestamps<F, G, T>
where
    T: Send,
    F: Fn(&T) -> i64 + Send + Sync,
    G: WatermarkGenerator<T>,
{
    fn push(&mut self, r: Record<T>) -> Result<(), StreamError> {
        let time = (self.extract)(&r.value);
        let mut output = WatermarkOutput::default();
        self.generator.on_event(&r.value, time, &mut output);
        self.out.push(Record {
            value: r.value,
            time: Some(time),
        })?;
        self.pass_on(output)
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), StreamError> {
        // Upstream watermarks are replaced by the generator's, except the
        // end of the input.
        if watermark == WATERMARK_END {
            self.emitted = WATERMARK_END;
            crate::metrics::with_current(|m| m.set_watermark(WATERMARK_END));
            return self.out.watermark(watermark);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        let mut output = WatermarkOutput::default();
        self.generator.on_periodic_emit(&mut output);
        self.pass_on(output)?;
        self.out.flush()
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.out.finish()
    }

    // Like Flink's, the watermark generator starts afresh on restore: its
    // first watermark follows the first records after it.
    crate::operator::forward_checkpoints!();
}
