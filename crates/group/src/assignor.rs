//! The server-side assignors of the consumer group protocol (KIP-848),
//! named as Kafka names them: `uniform` (the default) and `range`.
//!
//! Both are pure functions of the members' subscriptions, the partition
//! counts of the subscribed topics and, for `uniform`, the previous target
//! assignment, so the coordinator recomputes a target only when the group
//! epoch moves and gets the same answer for the same input.

use std::collections::{BTreeMap, BTreeSet};

/// Kafka's `UniformAssignor`: balanced and sticky.
pub(crate) const UNIFORM: &str = "uniform";
/// Kafka's server-side `RangeAssignor`: contiguous ranges per topic.
pub(crate) const RANGE: &str = "range";
/// Every assignor a member may ask for (`ServerAssignor`).
pub(crate) const ASSIGNORS: [&str; 2] = [UNIFORM, RANGE];

/// Partitions by topic (an id on the wire, a name in tests).
pub(crate) type Assignment<T> = BTreeMap<T, BTreeSet<i32>>;

/// A member as an assignor sees it.
pub(crate) struct AssignorMember<'a, T> {
    pub id: &'a str,
    /// The subscribed topics that exist.
    pub topics: BTreeSet<T>,
    /// Its previous target assignment, kept where balance allows.
    pub previous: Option<&'a Assignment<T>>,
}

/// The target assignment of every member (members without partitions
/// included), by member id.
pub(crate) fn assign<T: Ord + Clone>(
    assignor: &str,
    members: &[AssignorMember<'_, T>],
    partitions: &BTreeMap<T, i32>,
) -> BTreeMap<String, Assignment<T>> {
    let mut out: BTreeMap<String, Assignment<T>> = members
        .iter()
        .map(|m| (m.id.to_owned(), Assignment::new()))
        .collect();
    if assignor == RANGE {
        range(members, partitions, &mut out);
    } else {
        uniform(members, partitions, &mut out);
    }
    out
}

fn range<T: Ord + Clone>(
    members: &[AssignorMember<'_, T>],
    partitions: &BTreeMap<T, i32>,
    out: &mut BTreeMap<String, Assignment<T>>,
) {
    for (topic, &count) in partitions {
        let mut subscribers: Vec<&str> = members
            .iter()
            .filter(|m| m.topics.contains(topic))
            .map(|m| m.id)
            .collect();
        if subscribers.is_empty() || count <= 0 {
            continue;
        }
        subscribers.sort_unstable();
        let n = i32::try_from(subscribers.len()).unwrap_or(i32::MAX);
        let (each, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, member) in (0..).zip(subscribers) {
            let take = each + i32::from(i < extra);
            if take == 0 {
                continue;
            }
            if let Some(a) = out.get_mut(member) {
                a.entry(topic.clone())
                    .or_default()
                    .extend(next..next + take);
            }
            next += take;
        }
    }
}

/// Sticky and balanced: every member keeps what it had (of topics it still
/// subscribes to) up to its fair share, the rest goes to the least loaded
/// subscriber, then partitions move from the most to the least loaded
/// subscriber until no move narrows the gap. With identical subscriptions
/// no two members differ by more than one partition.
fn uniform<T: Ord + Clone>(
    members: &[AssignorMember<'_, T>],
    partitions: &BTreeMap<T, i32>,
    out: &mut BTreeMap<String, Assignment<T>>,
) {
    // Topics by index, so partitions are (topic index, partition).
    let topics: Vec<&T> = partitions
        .keys()
        .filter(|t| members.iter().any(|m| m.topics.contains(*t)))
        .collect();
    let candidates: Vec<Vec<usize>> = topics
        .iter()
        .map(|t| {
            (0..members.len())
                .filter(|&i| members[i].topics.contains(*t))
                .collect()
        })
        .collect();
    let all: Vec<(usize, i32)> = topics
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| (0..partitions[*t].max(0)).map(move |p| (ti, p)))
        .collect();
    if all.is_empty() || members.is_empty() {
        return;
    }
    // A member's fair share if everyone could take anything: members keep
    // at most this many of their previous partitions.
    let share = all.len().div_ceil(members.len());
    let mut owner: BTreeMap<(usize, i32), usize> = BTreeMap::new();
    let mut held: Vec<BTreeSet<(usize, i32)>> = vec![BTreeSet::new(); members.len()];
    for (i, m) in members.iter().enumerate() {
        let Some(previous) = m.previous else { continue };
        for (ti, t) in topics.iter().enumerate() {
            if !m.topics.contains(*t) {
                continue;
            }
            let Some(parts) = previous.get(*t) else {
                continue;
            };
            for &p in parts {
                if held[i].len() >= share || p >= partitions[*t] {
                    break;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = owner.entry((ti, p)) {
                    e.insert(i);
                    held[i].insert((ti, p));
                }
            }
        }
    }
    // The rest, the partitions with the fewest possible owners first.
    let mut rest: Vec<(usize, i32)> = all
        .iter()
        .copied()
        .filter(|tp| !owner.contains_key(tp))
        .collect();
    rest.sort_by_key(|&(ti, p)| (candidates[ti].len(), ti, p));
    for (ti, p) in rest {
        if let Some(&i) = candidates[ti]
            .iter()
            .min_by_key(|&&i| (held[i].len(), members[i].id))
        {
            owner.insert((ti, p), i);
            held[i].insert((ti, p));
        }
    }
    // Narrow the gaps: move a partition from a member to a subscriber with
    // at least two fewer, while one exists. Each move lowers the sum of
    // squared loads, so this ends.
    loop {
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(held[i].len()));
        let mut step = None;
        'members: for from in order {
            for &(ti, p) in held[from].iter().rev() {
                let to = candidates[ti]
                    .iter()
                    .copied()
                    .filter(|&i| held[i].len() + 1 < held[from].len())
                    .min_by_key(|&i| (held[i].len(), members[i].id));
                if let Some(to) = to {
                    step = Some((from, to, (ti, p)));
                    break 'members;
                }
            }
        }
        let Some((from, to, tp)) = step else { break };
        held[from].remove(&tp);
        held[to].insert(tp);
    }
    for (i, parts) in held.into_iter().enumerate() {
        if let Some(a) = out.get_mut(members[i].id) {
            for (ti, p) in parts {
                a.entry(topics[ti].clone()).or_default().insert(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members<'a>(
        subs: &'a [(String, BTreeSet<String>)],
        previous: &'a BTreeMap<String, Assignment<String>>,
    ) -> Vec<AssignorMember<'a, String>> {
        subs.iter()
            .map(|(id, topics)| AssignorMember {
                id,
                topics: topics.clone(),
                previous: previous.get(id),
            })
            .collect()
    }

    fn counts(a: &BTreeMap<String, Assignment<String>>) -> Vec<usize> {
        a.values()
            .map(|t| t.values().map(BTreeSet::len).sum())
            .collect()
    }

    /// Every partition of a subscribed topic goes to exactly one of its
    /// subscribers, and nothing else is handed out.
    fn check_complete(
        subs: &[(String, BTreeSet<String>)],
        partitions: &BTreeMap<String, i32>,
        a: &BTreeMap<String, Assignment<String>>,
    ) {
        let mut seen: BTreeSet<(String, i32)> = BTreeSet::new();
        for (member, topics) in a {
            let subscribed = &subs.iter().find(|(id, _)| id == member).expect("member").1;
            for (t, parts) in topics {
                assert!(
                    subscribed.contains(t),
                    "{member} got {t} it does not subscribe to"
                );
                for &p in parts {
                    assert!(p >= 0 && p < partitions[t], "{t}-{p} does not exist");
                    assert!(seen.insert((t.clone(), p)), "{t}-{p} assigned twice");
                }
            }
        }
        for (t, &n) in partitions {
            if subs.iter().any(|(_, topics)| topics.contains(t)) {
                for p in 0..n {
                    assert!(seen.contains(&(t.clone(), p)), "{t}-{p} unassigned");
                }
            }
        }
    }

    /// Members' subscriptions, and partition counts by topic.
    type Case = (Vec<(String, BTreeSet<String>)>, BTreeMap<String, i32>);

    fn case() -> impl Strategy<Value = Case> {
        let topics = prop::collection::btree_map("t[a-d]", 0i32..12, 1..4);
        (topics, 1usize..7).prop_flat_map(|(partitions, n)| {
            let names: Vec<String> = partitions.keys().cloned().collect();
            let subs =
                prop::collection::vec(prop::sample::subsequence(names.clone(), 0..=names.len()), n)
                    .prop_map(|sets| {
                        sets.into_iter()
                            .enumerate()
                            .map(|(i, s)| (format!("m{i}"), s.into_iter().collect()))
                            .collect::<Vec<_>>()
                    });
            (subs, Just(partitions))
        })
    }

    proptest! {
        #[test]
        fn uniform_and_range_hand_out_every_subscribed_partition_once((subs, partitions) in case()) {
            let none = BTreeMap::new();
            for assignor in ASSIGNORS {
                let a = assign(assignor, &members(&subs, &none), &partitions);
                check_complete(&subs, &partitions, &a);
            }
        }

        #[test]
        fn uniform_is_balanced_and_sticky_with_identical_subscriptions(
            (subs, partitions) in case(), leaver in 0usize..7,
        ) {
            let every: BTreeSet<String> = partitions.keys().cloned().collect();
            let subs: Vec<(String, BTreeSet<String>)> =
                subs.into_iter().map(|(id, _)| (id, every.clone())).collect();
            let none = BTreeMap::new();
            let first = assign(UNIFORM, &members(&subs, &none), &partitions);
            let c = counts(&first);
            prop_assert!(c.iter().max().unwrap_or(&0) - c.iter().min().unwrap_or(&0) <= 1);
            // The same input again changes nothing.
            let again = assign(UNIFORM, &members(&subs, &first), &partitions);
            prop_assert_eq!(&again, &first);
            // A member leaves: the others keep everything they had.
            if subs.len() > 1 {
                let gone = &subs[leaver % subs.len()].0;
                let rest: Vec<_> = subs.iter().filter(|(id, _)| id != gone).cloned().collect();
                let after = assign(UNIFORM, &members(&rest, &first), &partitions);
                check_complete(&rest, &partitions, &after);
                let c = counts(&after);
                prop_assert!(c.iter().max().unwrap_or(&0) - c.iter().min().unwrap_or(&0) <= 1);
                for (id, had) in &first {
                    if id == gone { continue; }
                    for (t, parts) in had {
                        let now = after[id].get(t).cloned().unwrap_or_default();
                        prop_assert!(parts.is_subset(&now), "{} lost {:?} of {}", id, parts.difference(&now).collect::<Vec<_>>(), t);
                    }
                }
            }
        }
    }

    #[test]
    fn range_gives_contiguous_ranges_and_the_extra_partitions_to_the_first_members() {
        let subs: Vec<(String, BTreeSet<String>)> = ["a", "b", "c"]
            .iter()
            .map(|id| (id.to_string(), ["t".to_owned()].into_iter().collect()))
            .collect();
        let partitions: BTreeMap<String, i32> = [("t".to_owned(), 7)].into_iter().collect();
        let a = assign(RANGE, &members(&subs, &BTreeMap::new()), &partitions);
        let got: Vec<Vec<i32>> = a
            .values()
            .map(|t| t["t"].iter().copied().collect())
            .collect();
        assert_eq!(got, vec![vec![0, 1, 2], vec![3, 4], vec![5, 6]]);
    }
}
