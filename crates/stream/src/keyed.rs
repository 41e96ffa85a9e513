//! Key groups and keyed state.
//!
//! A key's hash picks one of `max_parallelism` key groups; subtask `i` of
//! `p` owns the contiguous range Flink assigns it. The hash is SipHash-1-3
//! with fixed keys over the key's `Hash` output, so a key lands in the same
//! group in every process and every run: state snapshotted by key group can
//! be restored at another parallelism.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::ops::RangeInclusive;

use siphasher::sip::SipHasher13;

/// The key group of `key` among `max_parallelism`.
pub fn key_group_of<K: Hash + ?Sized>(key: &K, max_parallelism: usize) -> usize {
    let mut h = SipHasher13::new_with_keys(0x736c_7569_6365, 0x6b65_7967_726f_7570);
    key.hash(&mut h);
    (h.finish() % max_parallelism.max(1) as u64) as usize
}

/// The subtask (of `parallelism`) that owns key group `group`.
pub fn subtask_for_key_group(group: usize, parallelism: usize, max_parallelism: usize) -> usize {
    group * parallelism / max_parallelism.max(1)
}

/// The key groups subtask `subtask` of `parallelism` owns: exactly those
/// for which [`subtask_for_key_group`] gives `subtask`.
pub fn key_group_range(
    subtask: usize,
    parallelism: usize,
    max_parallelism: usize,
) -> RangeInclusive<usize> {
    let p = parallelism.max(1);
    let start = (subtask * max_parallelism).div_ceil(p);
    let end = ((subtask + 1) * max_parallelism).div_ceil(p);
    start..=end.saturating_sub(1)
}

/// State of one keyed operator in one subtask: a value per key, kept by
/// key group (the unit a snapshot is cut into and redistributed by).
#[derive(Debug)]
pub struct KeyedState<K, V> {
    first_group: usize,
    max_parallelism: usize,
    groups: Vec<HashMap<K, V>>,
}

impl<K: Hash + Eq, V> KeyedState<K, V> {
    /// Empty state for subtask `subtask` of `parallelism`.
    pub fn new(subtask: usize, parallelism: usize, max_parallelism: usize) -> KeyedState<K, V> {
        let range = key_group_range(subtask, parallelism, max_parallelism);
        let groups = range.clone().map(|_| HashMap::new()).collect();
        KeyedState {
            first_group: *range.start(),
            max_parallelism,
            groups,
        }
    }

    /// The map of `key`'s group. A key this subtask does not own (which a
    /// keyed exchange never delivers) is kept in the nearest group.
    fn group_mut(&mut self, key: &K) -> &mut HashMap<K, V> {
        if self.groups.is_empty() {
            self.groups.push(HashMap::new());
        }
        let g = key_group_of(key, self.max_parallelism);
        let i = g
            .saturating_sub(self.first_group)
            .min(self.groups.len() - 1);
        &mut self.groups[i]
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let g = key_group_of(key, self.max_parallelism);
        let i = g.saturating_sub(self.first_group);
        self.groups
            .get(i)
            .or_else(|| self.groups.last())
            .and_then(|m| m.get(key))
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.group_mut(key).get_mut(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.group_mut(&key).insert(key, value)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.group_mut(key).remove(key)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.groups.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each key group this subtask owns, with its entries.
    pub(crate) fn groups(&self) -> impl Iterator<Item = (usize, &HashMap<K, V>)> {
        self.groups
            .iter()
            .enumerate()
            .map(|(i, m)| (self.first_group + i, m))
    }

    /// The entries of key group `group` (empty when this subtask does not
    /// own it).
    pub fn group(&self, group: usize) -> impl Iterator<Item = (&K, &V)> {
        group
            .checked_sub(self.first_group)
            .and_then(|i| self.groups.get(i))
            .into_iter()
            .flat_map(|m| m.iter())
    }
}

/// Flink's `ValueState`: one value per key.
pub type ValueState<K, V> = KeyedState<K, V>;

/// Flink's `ListState`: a list per key ([`KeyedState::add`],
/// [`KeyedState::list`]).
pub type ListState<K, T> = KeyedState<K, Vec<T>>;

/// Flink's `MapState`: a map per key, iterated in its keys' order
/// ([`KeyedState::put`], [`KeyedState::entry_of`], [`KeyedState::remove_entry`]).
pub type MapState<K, MK, MV> = KeyedState<K, BTreeMap<MK, MV>>;

impl<K: Hash + Eq, V: Default> KeyedState<K, V> {
    /// `key`'s value, made with `V::default()` when it has none.
    pub fn get_or_default(&mut self, key: K) -> &mut V {
        self.group_mut(&key).entry(key).or_default()
    }
}

impl<K: Hash + Eq, T> KeyedState<K, Vec<T>> {
    /// Appends `value` to `key`'s list.
    ///
    /// ```
    /// use sluice_stream::ListState;
    ///
    /// let mut seen: ListState<&str, u32> = ListState::new(0, 1, 128);
    /// seen.add("a", 1);
    /// seen.add("a", 2);
    /// assert_eq!(seen.list(&"a"), &[1, 2]);
    /// assert!(seen.list(&"b").is_empty());
    /// ```
    pub fn add(&mut self, key: K, value: T) {
        self.get_or_default(key).push(value);
    }

    /// `key`'s list (empty when it has none).
    pub fn list(&self, key: &K) -> &[T] {
        self.get(key).map_or(&[], Vec::as_slice)
    }
}

impl<K: Hash + Eq, MK: Ord, MV> KeyedState<K, BTreeMap<MK, MV>> {
    /// Sets `entry` of `key`'s map to `value`; the value it replaces.
    ///
    /// ```
    /// use sluice_stream::MapState;
    ///
    /// let mut last_price: MapState<u64, String, u64> = MapState::new(0, 1, 128);
    /// last_price.put(7, "eur".into(), 100);
    /// last_price.put(7, "usd".into(), 110);
    /// assert_eq!(last_price.entry_of(&7, &"usd".to_string()), Some(&110));
    /// last_price.remove_entry(&7, &"eur".to_string());
    /// last_price.remove_entry(&7, &"usd".to_string());
    /// assert!(last_price.is_empty(), "a key whose map empties is gone");
    /// ```
    pub fn put(&mut self, key: K, entry: MK, value: MV) -> Option<MV> {
        self.get_or_default(key).insert(entry, value)
    }

    /// The value of `entry` in `key`'s map.
    pub fn entry_of(&self, key: &K, entry: &MK) -> Option<&MV> {
        self.get(key).and_then(|m| m.get(entry))
    }

    /// Removes `entry` from `key`'s map, and the key once its map is empty
    /// (so a checkpoint holds no empty maps).
    pub fn remove_entry(&mut self, key: &K, entry: &MK) -> Option<MV> {
        let map = self.group_mut(key);
        let inner = map.get_mut(key)?;
        let removed = inner.remove(entry);
        if inner.is_empty() {
            map.remove(key);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_partition_the_key_groups_as_the_assignment_does() {
        for max in [1, 7, 128, 1000] {
            for p in 1..=max.min(13) {
                let mut next = 0;
                for s in 0..p {
                    let r = key_group_range(s, p, max);
                    assert_eq!(*r.start(), next, "max {max} p {p} subtask {s}");
                    for g in r.clone() {
                        assert_eq!(subtask_for_key_group(g, p, max), s);
                    }
                    next = r.end() + 1;
                }
                assert_eq!(next, max);
            }
        }
    }

    #[test]
    fn keys_stay_in_their_group() {
        // Fixed: a change would strand every snapshot taken before it.
        assert_eq!(
            key_group_of("sluice", 128),
            key_group_of(&"sluice".to_owned(), 128)
        );
        let mut s: KeyedState<String, u32> = KeyedState::new(0, 1, 16);
        for i in 0..100 {
            s.insert(format!("k{i}"), i);
        }
        assert_eq!(s.len(), 100);
        let g = key_group_of("k7", 16);
        assert!(s.group(g).any(|(k, v)| k == "k7" && *v == 7));
        assert_eq!(s.remove(&"k7".to_owned()), Some(7));
        assert_eq!(s.get(&"k7".to_owned()), None);
        assert_eq!(s.get(&"k8".to_owned()), Some(&8));
    }
}
