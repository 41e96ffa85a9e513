//! Which quota applies, who shares its measurement, and that a client doing
//! what it is told settles at its quota.

use std::collections::BTreeMap;

use sluice_topology::quotas::{ClientQuota, QuotaValue};

use super::*;

/// (entity, quota key, bytes per second).
type Setting<'a> = (&'a [(&'a str, Option<&'a str>)], &'a str, f64);

fn model(entries: &[Setting]) -> QuotaModel {
    let mut m = QuotaModel::default();
    for (entity, key, value) in entries {
        let entity: Vec<(String, Option<String>)> = entity
            .iter()
            .map(|(k, n)| (k.to_string(), n.map(str::to_owned)))
            .collect();
        m.entries.push(ClientQuota {
            entity,
            values: BTreeMap::from([(key.to_string(), QuotaValue(*value))]),
        });
    }
    m.entries.sort_by(|a, b| a.entity.cmp(&b.entity));
    m
}

#[test]
fn the_most_specific_quota_applies_and_names_who_shares_it() {
    let p = PRODUCER_BYTE_RATE;
    let m = model(&[
        (&[(CLIENT_ID, None)], p, 1.0),
        (&[(CLIENT_ID, Some("app"))], p, 2.0),
        (&[(USER, None)], p, 3.0),
        (&[(CLIENT_ID, Some("app")), (USER, Some("u"))], p, 4.0),
    ]);
    let r = |user, client| resolve(&m, Flow::Produce, user, client);
    assert_eq!(r("u", "app"), Some((4.0, "u".into(), "app".into())));
    // The default user's quota outranks client-id quotas; it is per user.
    assert_eq!(r("v", "app"), Some((3.0, "v".into(), String::new())));
    let m = model(&[
        (&[(CLIENT_ID, None)], p, 1.0),
        (&[(CLIENT_ID, Some("app"))], p, 2.0),
    ]);
    let r = |user, client| resolve(&m, Flow::Produce, user, client);
    assert_eq!(r("v", "app"), Some((2.0, String::new(), "app".into())));
    // The default client quota holds for each client id on its own.
    assert_eq!(r("v", "other"), Some((1.0, String::new(), "other".into())));
    // Consumers have no quota here.
    assert_eq!(resolve(&m, Flow::Fetch, "v", "app"), None);
}

/// Bytes a client sends in `secs` seconds when it sends `chunk` at a time
/// and waits whatever it is told to after each.
fn obedient_client(q: &Quotas, m: &QuotaModel, chunk: usize, secs: u64) -> usize {
    let start = q.epoch;
    let end = start + Duration::from_secs(secs);
    let mut now = start;
    let mut sent = 0;
    while now < end {
        let wait = q.record(m, Flow::Produce, "app", chunk, false, now);
        sent += chunk;
        now += wait.max(Duration::from_millis(5));
    }
    sent
}

#[test]
fn a_client_that_waits_as_told_settles_at_its_quota() {
    let quota = 100_000.0;
    let m = model(&[(&[(CLIENT_ID, Some("app"))], PRODUCER_BYTE_RATE, quota)]);
    for secs in [60, 300] {
        let q = Quotas::new();
        let sent = obedient_client(&q, &m, 16 * 1024, secs) as f64;
        // A first burst of about a window's worth, then the quota.
        let allowed = quota * (secs + SAMPLES) as f64;
        assert!(
            sent <= allowed * 1.05,
            "{secs}s: sent {sent}, allowed {allowed}"
        );
        assert!(
            sent >= quota * secs as f64 * 0.9,
            "{secs}s: sent {sent}, quota {quota}/s"
        );
    }
    // Without a quota nobody waits.
    let q = Quotas::new();
    let none = QuotaModel::default();
    assert!(q
        .record(&none, Flow::Produce, "app", 1 << 30, false, q.epoch)
        .is_zero());
    assert_eq!(q.sensors(), 0);
}

#[test]
fn a_throttled_fetch_is_not_counted_and_a_wait_is_at_most_a_window() {
    let m = model(&[(&[(CLIENT_ID, None)], CONSUMER_BYTE_RATE, 1000.0)]);
    let q = Quotas::new();
    let at = q.epoch + Duration::from_secs(1);
    // Ten seconds' worth fits the first window; a huge answer is refused
    // and not counted, so the next small one still fits.
    assert!(q.record(&m, Flow::Fetch, "c", 5_000, true, at).is_zero());
    let wait = q.record(&m, Flow::Fetch, "c", 100_000_000, true, at);
    assert_eq!(wait, SAMPLE * SAMPLES as u32);
    assert!(q.record(&m, Flow::Fetch, "c", 4_000, true, at).is_zero());
    assert!(!q.record(&m, Flow::Fetch, "c", 4_000, false, at).is_zero());
}

#[test]
fn sensors_are_bounded_and_idle_ones_go_first() {
    let m = model(&[(&[(CLIENT_ID, None)], PRODUCER_BYTE_RATE, 1e9)]);
    let q = Quotas::new();
    for i in 0..MAX_SENSORS {
        q.record(&m, Flow::Produce, &format!("c{i}"), 1, false, q.epoch);
    }
    assert_eq!(q.sensors(), MAX_SENSORS);
    // All busy: one more replaces the least recently used.
    q.record(
        &m,
        Flow::Produce,
        "late",
        1,
        false,
        q.epoch + Duration::from_secs(1),
    );
    assert_eq!(q.sensors(), MAX_SENSORS);
    // A window later every old one is idle and goes.
    q.record(
        &m,
        Flow::Produce,
        "later",
        1,
        false,
        q.epoch + Duration::from_millis(11_500),
    );
    assert_eq!(q.sensors(), 2);
}
