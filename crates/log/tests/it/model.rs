//! Property test: the log against an in-memory model (a Vec of batches).

use proptest::prelude::*;
use sluice_log::{FlushPolicy, LogError, ReadLimit};

use crate::{batch, no_overrides, open, small_segments, stamped, Spec};

#[derive(Clone, Debug)]
enum Op {
    /// One append call of one or more batches: (record count, payload
    /// bytes, timestamp step).
    Append(Vec<(i32, usize, i64)>),
    /// offset_for_timestamp at a timestamp picked by the value.
    Timestamp(i64),
    /// `pos` picks an offset in [log_start - 1, log_end + 1].
    Read {
        pos: u16,
        max_bytes: usize,
        min_one: bool,
    },
    Truncate(u16),
    DeleteBefore(u16),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((1i32..6, 0usize..300, 0i64..2000), 1..4).prop_map(Op::Append),
        1 => (0i64..200_000).prop_map(Op::Timestamp),
        4 => (any::<u16>(), 0usize..2500, any::<bool>())
            .prop_map(|(pos, max_bytes, min_one)| Op::Read { pos, max_bytes, min_one }),
        1 => any::<u16>().prop_map(Op::Truncate),
        1 => any::<u16>().prop_map(Op::DeleteBefore),
        1 => Just(Op::Reopen),
    ]
}

struct Model {
    /// (base offset, last offset, stored bytes, max timestamp)
    batches: Vec<(i64, i64, Vec<u8>, i64)>,
    log_start: i64,
    log_end: i64,
}

impl Model {
    /// An offset in [log_start - 1, log_end + 1] picked by `pos`.
    fn pick(&self, pos: u16) -> i64 {
        let span = self.log_end - self.log_start + 3;
        self.log_start - 1 + i64::from(pos) % span
    }

    fn read(&self, offset: i64, max_bytes: usize, min_one: bool) -> Option<Vec<u8>> {
        if offset < self.log_start || offset > self.log_end {
            return None;
        }
        let mut out = Vec::new();
        for (_, _, bytes, _) in self.batches.iter().filter(|b| b.1 >= offset) {
            if out.len() + bytes.len() > max_bytes && !(out.is_empty() && min_one) {
                break;
            }
            out.extend_from_slice(bytes);
        }
        Some(out)
    }

    fn offset_for_timestamp(&self, ts: i64) -> Option<(i64, i64)> {
        self.batches
            .iter()
            .find(|b| b.3 >= ts && b.1 >= self.log_start)
            .map(|b| (b.0.max(self.log_start), b.3))
    }

    fn truncate(&mut self, offset: i64) {
        if offset >= self.log_end {
            return;
        }
        if offset < self.log_start {
            self.batches.clear();
            self.log_start = offset;
            self.log_end = offset;
            return;
        }
        if let Some(i) = self.batches.iter().position(|b| b.1 >= offset) {
            self.log_end = self.batches[i].0;
            self.batches.truncate(i);
        }
        self.log_start = self.log_start.min(self.log_end);
    }
}

fn run(ops: Vec<Op>, segment_bytes: u64, interval: u32) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let defaults = small_segments(segment_bytes, interval);
    let flush = FlushPolicy::Never;
    let mut store = open(dir.path(), flush, defaults.clone());
    store.create_topic("t", 1, &no_overrides(), false).unwrap();
    let mut model = Model {
        batches: Vec::new(),
        log_start: 0,
        log_end: 0,
    };
    let mut epoch = 0i32;
    let mut fill = 0u8;
    // Timestamps wander upwards with occasional steps back.
    let ts_base = crate::now_ms() - 100_000_000;
    let mut ts = ts_base;
    for op in ops {
        let p = store.partition("t", 0).unwrap();
        match op {
            Op::Append(specs) => {
                let mut call = Vec::new();
                let mut raws = Vec::new();
                for (count, payload, step) in specs {
                    fill = fill.wrapping_add(31);
                    ts += step - 300;
                    let b = batch(&Spec {
                        fill,
                        ..Spec::plain(count, payload).at(ts)
                    });
                    call.extend_from_slice(&b);
                    raws.push((b, count, ts));
                }
                let r = p.append(&call, epoch).unwrap();
                prop_assert_eq!(r.base_offset, model.log_end);
                prop_assert!(!r.duplicate);
                for (b, count, t) in raws {
                    let base = model.log_end;
                    let last = base + i64::from(count) - 1;
                    model
                        .batches
                        .push((base, last, stamped(&b, base, epoch), t));
                    model.log_end = last + 1;
                }
                prop_assert_eq!(r.end_offset, model.log_end);
            }
            Op::Read {
                pos,
                max_bytes,
                min_one,
            } => {
                let offset = model.pick(pos);
                let got = p.read(offset, max_bytes, min_one, ReadLimit::HighWatermark);
                match (model.read(offset, max_bytes, min_one), got) {
                    (None, Err(LogError::OffsetOutOfRange { .. })) => {}
                    (Some(want), Ok(r)) => {
                        prop_assert_eq!(r.records.as_ref(), want.as_slice(), "offset {}", offset);
                        prop_assert_eq!(r.log_start_offset, model.log_start);
                        prop_assert_eq!(r.log_end_offset, model.log_end);
                        prop_assert_eq!(r.high_watermark, model.log_end);
                    }
                    (want, got) => {
                        return Err(TestCaseError::fail(format!(
                            "read at {offset}: model {want:?}, log {got:?}"
                        )))
                    }
                }
            }
            Op::Timestamp(pick) => {
                let t = ts_base - 1000 + pick;
                prop_assert_eq!(
                    p.offset_for_timestamp(t).unwrap(),
                    model.offset_for_timestamp(t),
                    "timestamp {}",
                    t
                );
            }
            Op::Truncate(pos) => {
                let offset = model.pick(pos).max(0);
                p.truncate_to(offset).unwrap();
                model.truncate(offset);
            }
            Op::DeleteBefore(pos) => {
                let offset = model.pick(pos);
                let got = p.delete_records_before(offset);
                if offset > model.log_end || (offset < 0 && offset != -1) {
                    prop_assert!(got.is_err(), "delete_records_before({}) accepted", offset);
                } else {
                    let target = if offset == -1 { model.log_end } else { offset };
                    model.log_start = model.log_start.max(target);
                    prop_assert_eq!(got.unwrap(), model.log_start);
                }
            }
            Op::Reopen => {
                drop(p);
                drop(store);
                store = open(dir.path(), flush, defaults.clone());
                epoch += 1;
            }
        }
        let p = store.partition("t", 0).unwrap();
        prop_assert_eq!(p.log_end_offset(), model.log_end);
        prop_assert_eq!(p.log_start_offset(), model.log_start);
    }
    // Finally everything readable from the log start matches the model.
    let p = store.partition("t", 0).unwrap();
    let all = p
        .read(model.log_start, usize::MAX / 2, true, ReadLimit::LogEnd)
        .unwrap();
    let want = model.read(model.log_start, usize::MAX / 2, true).unwrap();
    prop_assert_eq!(all.records.as_ref(), want.as_slice());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_agrees_with_model(
        ops in prop::collection::vec(op(), 1..60),
        segment_bytes in 200u64..3000,
        interval in prop_oneof![Just(0u32), 50u32..500, Just(4096u32)],
    ) {
        run(ops, segment_bytes, interval)?;
    }
}
