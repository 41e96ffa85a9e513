//! Sparse offset index and time index of one segment.
//!
//! Both are kept in memory (a few bytes per `index.interval.bytes` of log)
//! and mirrored to `.index` / `.timeindex` files. Entries are derived
//! deterministically from the batch sequence, so recovery can rebuild them
//! from the log and compare with the files.
//!
//! `.index` entry: relative offset u32 BE + file position u32 BE (8 bytes).
//! `.timeindex` entry: max timestamp so far i64 BE + relative offset u32 BE
//! of the batch that carried it (12 bytes).

pub(crate) const OFFSET_ENTRY: usize = 8;
pub(crate) const TIME_ENTRY: usize = 12;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegIndex {
    /// (relative base offset of a batch, its file position), increasing.
    pub offsets: Vec<(u32, u32)>,
    /// (max timestamp of the segment up to that batch, relative offset of
    /// the batch that first reached it), increasing in both.
    pub times: Vec<(i64, u32)>,
    bytes_since_entry: u64,
    /// Largest batch max timestamp in the segment, -1 when none.
    pub max_timestamp: i64,
    rel_of_max: u32,
}

impl Default for SegIndex {
    fn default() -> Self {
        SegIndex {
            offsets: Vec::new(),
            times: Vec::new(),
            bytes_since_entry: 0,
            max_timestamp: -1,
            rel_of_max: 0,
        }
    }
}

impl SegIndex {
    /// Accounts for a batch appended at `pos`, adding index entries for it
    /// when due. An entry is added when more than `interval` bytes were appended since
    /// the previous one (Kafka's rule), pointing at this batch's start.
    pub fn add_batch(&mut self, rel: u32, pos: u32, max_ts: i64, size: u64, interval: u32) {
        if max_ts > self.max_timestamp {
            self.max_timestamp = max_ts;
            self.rel_of_max = rel;
        }
        if pos > 0 && self.bytes_since_entry > u64::from(interval) {
            self.offsets.push((rel, pos));
            if self.max_timestamp >= 0 && self.times.last().is_none_or(|t| self.max_timestamp > t.0)
            {
                self.times.push((self.max_timestamp, self.rel_of_max));
            }
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry += size;
    }

    /// File position of the last indexed batch starting at or before `rel`.
    pub fn position_for(&self, rel: i64) -> u64 {
        if rel <= 0 {
            return 0;
        }
        let rel = u32::try_from(rel).unwrap_or(u32::MAX);
        let i = self.offsets.partition_point(|e| e.0 <= rel);
        match i.checked_sub(1).and_then(|i| self.offsets.get(i)) {
            Some(e) => u64::from(e.1),
            None => 0,
        }
    }

    /// Relative offset of a batch from which a scan for the first batch
    /// with max timestamp >= `ts` may start (every earlier batch is below `ts`).
    pub fn scan_start_for_timestamp(&self, ts: i64) -> u32 {
        let i = self.times.partition_point(|e| e.0 < ts);
        match i.checked_sub(1).and_then(|i| self.times.get(i)) {
            // Every batch up to and including the one that reached e.0 is
            // below ts, so the scan may start right there.
            Some(e) => e.1,
            None => 0,
        }
    }

    pub fn encode_offsets(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.offsets.len() * OFFSET_ENTRY);
        for (rel, pos) in &self.offsets {
            out.extend_from_slice(&encode_offset_entry(*rel, *pos));
        }
        out
    }

    pub fn encode_times(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.times.len() * TIME_ENTRY);
        for (ts, rel) in &self.times {
            out.extend_from_slice(&encode_time_entry(*ts, *rel));
        }
        out
    }
}

pub(crate) fn encode_offset_entry(rel: u32, pos: u32) -> [u8; OFFSET_ENTRY] {
    let mut b = [0u8; OFFSET_ENTRY];
    b[..4].copy_from_slice(&rel.to_be_bytes());
    b[4..].copy_from_slice(&pos.to_be_bytes());
    b
}

pub(crate) fn encode_time_entry(ts: i64, rel: u32) -> [u8; TIME_ENTRY] {
    let mut b = [0u8; TIME_ENTRY];
    b[..8].copy_from_slice(&ts.to_be_bytes());
    b[8..].copy_from_slice(&rel.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_interval_and_lookup_floors() {
        let mut ix = SegIndex::default();
        let mut pos = 0u32;
        for i in 0..10u32 {
            ix.add_batch(i * 2, pos, i64::from(i) * 10, 100, 150);
            pos += 100;
        }
        // An entry whenever more than 150 bytes accumulated: every second batch.
        assert_eq!(ix.offsets, vec![(4, 200), (8, 400), (12, 600), (16, 800)]);
        assert_eq!(ix.position_for(0), 0);
        assert_eq!(ix.position_for(5), 200);
        assert_eq!(ix.position_for(9), 400);
        assert_eq!(ix.position_for(100), 800);
        assert_eq!(ix.max_timestamp, 90);
        assert_eq!(ix.times.first(), Some(&(20, 4)));
        assert_eq!(ix.scan_start_for_timestamp(25), 4);
        assert_eq!(ix.scan_start_for_timestamp(5), 0);
        assert_eq!(ix.encode_offsets().len(), 4 * OFFSET_ENTRY);
    }
}
