//! Client quota enforcement, as a Kafka broker does it: each node measures
//! the bytes it takes from producers and gives to consumers per quota
//! entity, over [`SAMPLES`] one-second samples, and a client above its
//! quota is told to wait (`throttle_time_ms`) while its connection is muted
//! for that long (KIP-219). A throttled fetch is answered with no records,
//! and what it would have returned is not counted.
//!
//! Quotas live in the metadata image (`sluice_cluster::quotas`). The quota
//! that applies is the most specific one set, in Kafka's order: user and
//! client id, user and default client, user, default user and client id,
//! default user and default client, default user, client id, default
//! client. Whoever shares that entity shares its measurement: a quota on a
//! client id holds for all its connections together; a default quota holds
//! for each client id (or user) on its own. Without authentication every
//! client is the user `ANONYMOUS`, as on Kafka.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_topology::quotas::{
    QuotaModel, CLIENT_ID, CONSUMER_BYTE_RATE, PRODUCER_BYTE_RATE, USER,
};
use tokio::time::Instant;

use crate::connection::Client;
use crate::server::Ctx;

/// Kafka's `quota.window.num` and `quota.window.size.seconds`.
pub(crate) const SAMPLES: u64 = 11;
pub(crate) const SAMPLE: Duration = Duration::from_secs(1);

/// Kafka's name of the unauthenticated principal.
pub(crate) const ANONYMOUS: &str = "ANONYMOUS";

/// Sensors kept at once; idle ones (rate zero anyway) make room first.
const MAX_SENSORS: usize = 10_000;

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Flow {
    Produce,
    Fetch,
}

impl Flow {
    fn key(self) -> &'static str {
        match self {
            Flow::Produce => PRODUCER_BYTE_RATE,
            Flow::Fetch => CONSUMER_BYTE_RATE,
        }
    }
}

/// Who a sensor measures: the flow and a hash of the entity's (user, client
/// id) tags, empty where the quota does not tell them apart. Hashed, so a
/// sensor costs the same whatever a client calls itself.
type SensorKey = (Flow, u64);

/// One level of Kafka's quota order: the entity, and whether its sensor is
/// told apart by user and by client id.
type Level<'a> = (&'a [(&'a str, Option<&'a str>)], bool, bool);

/// The quota bound for `flow` of client (`user`, `client_id`) and the tags of
/// the sensor that measures it.
fn resolve(
    model: &QuotaModel,
    flow: Flow,
    user: &str,
    client_id: &str,
) -> Option<(f64, String, String)> {
    let u = Some(user);
    let c = Some(client_id);
    // Most specific first; entities are sorted by type (client-id < user).
    let levels: [Level; 8] = [
        (&[(CLIENT_ID, c), (USER, u)], true, true),
        (&[(CLIENT_ID, None), (USER, u)], true, true),
        (&[(USER, u)], true, false),
        (&[(CLIENT_ID, c), (USER, None)], true, true),
        (&[(CLIENT_ID, None), (USER, None)], true, true),
        (&[(USER, None)], true, false),
        (&[(CLIENT_ID, c)], false, true),
        (&[(CLIENT_ID, None)], false, true),
    ];
    levels.iter().find_map(|(entity, by_user, by_client)| {
        let bound = model.of(entity)?.get(flow.key())?.0;
        let tag = |on: bool, v: &str| if on { v.to_owned() } else { String::new() };
        Some((bound, tag(*by_user, user), tag(*by_client, client_id)))
    })
}

/// Bytes per sample over the last [`SAMPLES`] samples, as Kafka's `Rate`.
struct Sensor {
    /// Start (ms since the broker's epoch) and bytes of each sample; `None`
    /// for a sample not used yet.
    samples: [Option<(u64, f64)>; SAMPLES as usize],
    current: usize,
    last_ms: u64,
}

fn window_ms() -> u64 {
    SAMPLES * SAMPLE.as_millis() as u64
}

impl Sensor {
    fn new(now_ms: u64) -> Sensor {
        let mut samples = [None; SAMPLES as usize];
        samples[0] = Some((now_ms, 0.0));
        Sensor {
            samples,
            current: 0,
            last_ms: now_ms,
        }
    }

    fn record(&mut self, bytes: f64, now_ms: u64) {
        let sample_ms = SAMPLE.as_millis() as u64;
        let (start, _) = self.samples[self.current].unwrap_or((now_ms, 0.0));
        if now_ms >= start + sample_ms {
            self.current = (self.current + 1) % self.samples.len();
            self.samples[self.current] = Some((now_ms, 0.0));
        }
        if let Some((_, total)) = &mut self.samples[self.current] {
            *total += bytes;
        }
        self.last_ms = now_ms;
    }

    /// (bytes per second, the window it is measured over in ms).
    fn rate(&self, now_ms: u64) -> (f64, u64) {
        let live = self
            .samples
            .iter()
            .flatten()
            .filter(|(start, _)| start + window_ms() > now_ms);
        let (oldest, total) = live.fold((now_ms, 0.0), |(oldest, total), (start, bytes)| {
            (oldest.min(*start), total + bytes)
        });
        // As Kafka: a window shorter than all but one sample counts as that
        // long, so a client's first burst is not read as a huge rate.
        let sample_ms = SAMPLE.as_millis() as u64;
        let min_window = (SAMPLES - 1) * sample_ms;
        let elapsed = (now_ms - oldest).max(min_window);
        (total / (elapsed as f64 / 1000.0), elapsed)
    }
}

pub(crate) struct Quotas {
    epoch: Instant,
    sensors: Mutex<HashMap<SensorKey, Sensor>>,
    tags: std::collections::hash_map::RandomState,
}

impl Quotas {
    pub(crate) fn new() -> Quotas {
        Quotas {
            epoch: Instant::now(),
            sensors: Mutex::new(HashMap::new()),
            tags: std::collections::hash_map::RandomState::new(),
        }
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts `bytes` of `flow` for a client and answers how long it must
    /// wait (zero within its quota or without one). With `drop_if_throttled`
    /// (a fetch) a throttled amount is not counted: it is not sent.
    pub(crate) fn record(
        &self,
        model: &QuotaModel,
        flow: Flow,
        client_id: &str,
        bytes: usize,
        drop_if_throttled: bool,
        now: Instant,
    ) -> Duration {
        if model.entries.is_empty() {
            return Duration::ZERO;
        }
        let Some((bound, user_tag, client_tag)) = resolve(model, flow, ANONYMOUS, client_id) else {
            return Duration::ZERO;
        };
        let now_ms = self.now_ms(now);
        let mut sensors = self.sensors.lock();
        let key = (flow, self.tags.hash_one((&user_tag, &client_tag)));
        if !sensors.contains_key(&key) && sensors.len() >= MAX_SENSORS {
            make_room(&mut sensors, now_ms);
        }
        let sensor = sensors.entry(key).or_insert_with(|| Sensor::new(now_ms));
        let bytes = bytes as f64;
        sensor.record(bytes, now_ms);
        let (rate, window) = sensor.rate(now_ms);
        if rate <= bound {
            return Duration::ZERO;
        }
        if drop_if_throttled {
            sensor.record(-bytes, now_ms);
        }
        // Kafka's ClientQuotaManager: the time at the quota it takes to
        // bring the rate back to it, at most one window.
        let ms = ((rate - bound) / bound * window as f64).min(window_ms() as f64);
        Duration::from_millis(ms.max(0.0) as u64)
    }

    #[cfg(test)]
    fn sensors(&self) -> usize {
        self.sensors.lock().len()
    }
}

/// The throttle for `bytes` of `flow` from `client` (the connection's client;
/// `None` outside a connection, which is never throttled), muting the
/// connection for that long: what the response's `throttle_time_ms` says.
pub(crate) fn throttle(
    ctx: &Ctx,
    client: Option<&Client>,
    flow: Flow,
    bytes: usize,
    drop_if_throttled: bool,
) -> i32 {
    let Some(client) = client else {
        return 0;
    };
    let image = ctx.topology.image();
    if image.quotas.entries.is_empty() {
        return 0;
    }
    let wait = ctx.quotas.record(
        &image.quotas,
        flow,
        client.id().as_str(),
        bytes,
        drop_if_throttled,
        Instant::now(),
    );
    if wait.is_zero() {
        return 0;
    }
    client.mute_for(wait);
    i32::try_from(wait.as_millis()).unwrap_or(i32::MAX)
}

/// The most one fetch may return to `client` under a consumer quota: what
/// the quota lets through in the shortest window it is measured over. A
/// larger answer would be throttled, not counted and read again, for ever;
/// Kafka caps fetches the same way. `None` without a quota.
pub(crate) fn fetch_cap(ctx: &Ctx, client: Option<&Client>) -> Option<usize> {
    let client = client?;
    let image = ctx.topology.image();
    if image.quotas.entries.is_empty() {
        return None;
    }
    let (bound, _, _) = resolve(&image.quotas, Flow::Fetch, ANONYMOUS, client.id().as_str())?;
    let window_s = ((SAMPLES - 1) * SAMPLE.as_secs()) as f64;
    Some((bound * window_s).min(i32::MAX as f64).max(1.0) as usize)
}

/// Drops the sensors idle for a whole window (their rate is zero), or, if
/// none is, the least recently used.
fn make_room(sensors: &mut HashMap<SensorKey, Sensor>, now_ms: u64) {
    let before = sensors.len();
    sensors.retain(|_, s| s.last_ms + window_ms() > now_ms);
    if sensors.len() == before {
        if let Some(key) = sensors
            .iter()
            .min_by_key(|(_, s)| s.last_ms)
            .map(|(k, _)| *k)
        {
            sensors.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests;
