//! What the Kafka front end counts for `GET /metrics`: how long each
//! request took, by API, and the connections open.
//!
//! A request's time runs from reading its frame to its response being ready
//! to write (long polls and acks waits included, as Kafka's
//! `RequestTotalTimeMs`). Each API's histogram is made once, so a request
//! costs one uncontended lock in its histogram, never a label lookup.

use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: String,
}

type Histograms = Family<ApiLabels, Histogram, fn() -> Histogram>;

/// 100 µs to about 3.3 s, doubling.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// Request figures of one listener.
pub struct KafkaMetrics {
    latency: Histograms,
    /// The histogram of each API key, by key.
    by_key: Vec<Option<Histogram>>,
    connections: Gauge,
}

impl Default for KafkaMetrics {
    fn default() -> Self {
        let latency: Histograms = Family::new_with_constructor(request_histogram);
        // The APIs this broker serves, so a scrape shows each of them (at
        // zero until used) and no other.
        let mut by_key: Vec<Option<Histogram>> = Vec::new();
        for &(key, _, _) in crate::SUPPORTED_APIS {
            let (Ok(api), Ok(slot)) = (ApiKey::try_from(key), usize::try_from(key)) else {
                continue;
            };
            if by_key.len() <= slot {
                by_key.resize(slot + 1, None);
            }
            by_key[slot] = Some(
                latency
                    .get_or_create(&ApiLabels {
                        api: format!("{api:?}"),
                    })
                    .clone(),
            );
        }
        KafkaMetrics {
            latency,
            by_key,
            connections: Gauge::default(),
        }
    }
}

impl KafkaMetrics {
    /// A request with API key `key` was answered after `took`.
    pub(crate) fn request(&self, key: i16, took: Duration) {
        let slot = usize::try_from(key).ok().and_then(|k| self.by_key.get(k));
        if let Some(Some(h)) = slot {
            h.observe(took.as_secs_f64());
        }
    }

    /// A connection opened; it counts until the guard drops.
    pub(crate) fn connection(&self) -> ConnectionCount {
        self.connections.inc();
        ConnectionCount(self.connections.clone())
    }

    /// Adds the listener's series to `registry` (under its prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "kafka_request_duration",
            "Time from reading a Kafka request to its response being ready, by API",
            Unit::Seconds,
            self.latency.clone(),
        );
        registry.register(
            "kafka_connections",
            "Kafka client connections open",
            self.connections.clone(),
        );
    }
}

/// One open connection in the gauge.
pub(crate) struct ConnectionCount(Gauge);

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.dec();
    }
}
