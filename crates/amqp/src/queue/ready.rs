//! A queue's ready messages (read from the log, never delivered): one FIFO per
//! priority level (`x-max-priority` + 1 levels, one for other queues), each in
//! offset order. The next message is the oldest of the highest non-empty level;
//! the oldest message overall is what expiry and drop-head act on.

use std::collections::VecDeque;

use crate::message::Stored;

#[derive(Debug)]
pub(super) struct Ready {
    levels: Vec<VecDeque<Stored>>,
    len: usize,
}

impl Ready {
    pub(super) fn new(max_priority: Option<u8>) -> Ready {
        let n = max_priority.map_or(1, |p| usize::from(p) + 1);
        Ready {
            levels: (0..n).map(|_| VecDeque::new()).collect(),
            len: 0,
        }
    }

    /// The level of a message: its `priority` property, at most the queue's
    /// maximum (RabbitMQ's rule), 0 without one.
    pub(super) fn level_of(&self, m: &Stored) -> usize {
        let top = self.levels.len() - 1;
        m.properties
            .priority()
            .map_or(0, |p| usize::from(p).min(top))
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A message just read (offsets only grow as the log is read).
    pub(super) fn push_back(&mut self, m: Stored) {
        let l = self.level_of(&m);
        self.levels[l].push_back(m);
        self.len += 1;
    }

    /// A message taken and not delivered goes back where it was.
    pub(super) fn push_front(&mut self, m: Stored) {
        let l = self.level_of(&m);
        self.levels[l].push_front(m);
        self.len += 1;
    }

    /// The message to hand out next.
    pub(super) fn next(&self) -> Option<&Stored> {
        self.levels.iter().rev().find_map(VecDeque::front)
    }

    pub(super) fn pop_next(&mut self) -> Option<Stored> {
        let m = self.levels.iter_mut().rev().find_map(VecDeque::pop_front)?;
        self.len -= 1;
        Some(m)
    }

    /// The message stored first, whatever its priority.
    pub(super) fn oldest(&self) -> Option<&Stored> {
        self.levels
            .iter()
            .filter_map(VecDeque::front)
            .min_by_key(|m| m.offset)
    }

    pub(super) fn pop_oldest(&mut self) -> Option<Stored> {
        let level = self
            .levels
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.front().map(|m| (m.offset, i)))
            .min()?
            .1;
        let m = self.levels[level].pop_front()?;
        self.len -= 1;
        Some(m)
    }

    pub(super) fn offsets(&self) -> impl Iterator<Item = i64> + '_ {
        self.levels.iter().flat_map(|l| l.iter().map(|m| m.offset))
    }

    pub(super) fn clear(&mut self) {
        for l in &mut self.levels {
            l.clear();
        }
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn message(offset: i64, priority: Option<u8>) -> Stored {
        let mut properties = AMQPProperties::default();
        if let Some(p) = priority {
            properties = properties.with_priority(p);
        }
        Stored {
            offset,
            timestamp: 0,
            exchange: String::new(),
            routing_key: String::new(),
            properties,
            body: Bytes::new(),
        }
    }

    proptest! {
        /// Against a model: the next message is the highest (capped) priority,
        /// oldest first within it; the oldest is the lowest offset.
        #[test]
        fn orders_by_priority_then_offset(
            max in proptest::option::of(0u8..12),
            priorities in proptest::collection::vec(proptest::option::of(0u8..20), 0..60),
            ops in proptest::collection::vec(any::<bool>(), 0..80),
        ) {
            let mut ready = Ready::new(max);
            let top = max.unwrap_or(0);
            let mut model: Vec<(u8, i64)> = Vec::new();
            for (offset, p) in priorities.iter().enumerate() {
                let offset = offset as i64;
                ready.push_back(message(offset, *p));
                model.push((p.unwrap_or(0).min(top), offset));
            }
            for by_priority in ops {
                prop_assert_eq!(ready.len(), model.len());
                let want = if by_priority {
                    model.iter().copied().min_by_key(|&(p, o)| (std::cmp::Reverse(p), o))
                } else {
                    model.iter().copied().min_by_key(|&(_, o)| o)
                };
                let got = if by_priority { ready.pop_next() } else { ready.pop_oldest() };
                prop_assert_eq!(got.map(|m| m.offset), want.map(|(_, o)| o));
                if let Some(w) = want {
                    model.retain(|&x| x != w);
                }
            }
        }
    }
}
