//! What the Kafka front end counts for `GET /metrics`: how long each
//! request took and the error codes its response carried, by API, and the
//! connections open.
//!
//! A request's time runs from reading its frame to its response being ready
//! to write (long polls and acks waits included, as Kafka's
//! `RequestTotalTimeMs`). Each API's histogram and its counter of error code
//! NONE are made once, so a request costs one uncontended lock in its
//! histogram and one atomic add, never a label lookup; only an error code
//! other than NONE looks its counter up (once per run of equal codes in a
//! response). With the hot-path switch off (`sluice_log::set_hot_path_metrics`)
//! requests count nothing.

use std::fmt::Write as _;
use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use sluice_vocab::ErrorCode;

use crate::error_counts::ErrorCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: String,
}

type Histograms = Family<ApiLabels, Histogram, fn() -> Histogram>;

/// An API by key, shown by its Kafka name (`Produce`): a label that costs
/// no string to look up.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ApiName(i16);

impl EncodeLabelValue for ApiName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match ApiKey::try_from(self.0) {
            Ok(api) => write!(encoder, "{api:?}"),
            Err(()) => write!(encoder, "{}", self.0),
        }
    }
}

/// An error code by Kafka's name (`NOT_LEADER_OR_FOLLOWER`); `None` is 0,
/// `NONE`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ErrorName(Option<ErrorCode>);

impl ErrorName {
    /// A number Kafka has not defined counts as UNKNOWN_SERVER_ERROR, so the
    /// label set stays bounded by the codes Kafka has.
    fn of(code: i16) -> ErrorName {
        ErrorName(ErrorCode::check(code).err())
    }
}

impl EncodeLabelValue for ErrorName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.map_or("NONE", ErrorCode::name))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: ApiName,
    error: ErrorName,
}

/// What one API's requests are counted in, made once.
#[derive(Clone)]
struct PerApi {
    latency: Histogram,
    /// Error code NONE, the common case, without a label lookup.
    none: Counter,
}

/// 100 µs to about 3.3 s, doubling.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// Request figures of one listener.
pub struct KafkaMetrics {
    latency: Histograms,
    requests: Family<RequestLabels, Counter>,
    /// The figures of each API key, by key.
    by_key: Vec<Option<PerApi>>,
    connections: Gauge,
    fetch_sessions: crate::fetch_sessions::SessionFigures,
}

impl Default for KafkaMetrics {
    fn default() -> Self {
        let latency: Histograms = Family::new_with_constructor(request_histogram);
        // The APIs this broker serves, so a scrape shows each of them (at
        // zero until used) and no other.
        let requests = Family::<RequestLabels, Counter>::default();
        let mut by_key: Vec<Option<PerApi>> = Vec::new();
        for &(key, _, _) in crate::SUPPORTED_APIS {
            let (Ok(api), Ok(slot)) = (ApiKey::try_from(key), usize::try_from(key)) else {
                continue;
            };
            if by_key.len() <= slot {
                by_key.resize(slot + 1, None);
            }
            by_key[slot] = Some(PerApi {
                latency: latency
                    .get_or_create(&ApiLabels {
                        api: format!("{api:?}"),
                    })
                    .clone(),
                none: requests
                    .get_or_create(&RequestLabels {
                        api: ApiName(key),
                        error: ErrorName(None),
                    })
                    .clone(),
            });
        }
        KafkaMetrics {
            latency,
            requests,
            by_key,
            connections: Gauge::default(),
            fetch_sessions: Default::default(),
        }
    }
}

impl KafkaMetrics {
    /// A request with API key `key` was answered after `took`.
    pub(crate) fn request(&self, key: i16, took: Duration) {
        if !sluice_log::hot_path_metrics() {
            return;
        }
        if let Some(api) = self.api(key) {
            api.latency.observe(took.as_secs_f64());
        }
    }

    fn api(&self, key: i16) -> Option<&PerApi> {
        let slot = usize::try_from(key).ok()?;
        self.by_key.get(slot)?.as_ref()
    }

    /// A response to a request with API key `key`, at `version`, was built:
    /// counts the error codes it carries (see [`ErrorCounts`]); one that
    /// carries none (an empty answer) counts as NONE, so every request
    /// counts at least once.
    pub(crate) fn responded<R: ErrorCounts + ?Sized>(&self, key: i16, version: i16, resp: &R) {
        if !sluice_log::hot_path_metrics() {
            return;
        }
        let Some(api) = self.api(key) else {
            return;
        };
        // Runs of equal codes are added at once: a response of many
        // partitions costs one add per run, not one per partition.
        let mut run: (i16, u64) = (0, 0);
        let mut any = false;
        resp.error_codes(version, &mut |code| {
            any = true;
            if code == run.0 {
                run.1 += 1;
            } else {
                self.add(key, api, run);
                run = (code, 1);
            }
        });
        if !any {
            run = (0, 1);
        }
        self.add(key, api, run);
    }

    fn add(&self, key: i16, api: &PerApi, (code, n): (i16, u64)) {
        if n == 0 {
            return;
        }
        if code == 0 {
            api.none.inc_by(n);
        } else {
            let labels = RequestLabels {
                api: ApiName(key),
                error: ErrorName::of(code),
            };
            self.requests.get_or_create(&labels).inc_by(n);
        }
    }

    /// A connection opened; it counts until the guard drops.
    pub(crate) fn connection(&self) -> ConnectionCount {
        self.connections.inc();
        ConnectionCount(self.connections.clone())
    }

    /// The fetch session cache's figures, which it keeps up to date.
    pub(crate) fn fetch_session_figures(&self) -> crate::fetch_sessions::SessionFigures {
        self.fetch_sessions.clone()
    }

    /// Adds the listener's series to `registry` (under its prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kafka_connections",
            "Kafka client connections open",
            self.connections.clone(),
        );
        registry.register(
            "kafka_fetch_sessions",
            "Incremental fetch sessions (KIP-227) cached (Kafka's NumIncrementalFetchSessions)",
            self.fetch_sessions.sessions.clone(),
        );
        registry.register(
            "kafka_fetch_session_partitions",
            "Partitions held by the cached fetch sessions (Kafka's NumIncrementalFetchPartitionsCached)",
            self.fetch_sessions.partitions.clone(),
        );
        registry.register(
            "kafka_fetch_session_evictions",
            "Fetch sessions evicted to make room for new ones (Kafka's IncrementalFetchSessionEvictionsPerSec)",
            self.fetch_sessions.evictions.clone(),
        );
        // Switched off, requests kept nothing: nothing to show.
        if !sluice_log::hot_path_metrics() {
            return;
        }
        registry.register_with_unit(
            "kafka_request_duration",
            "Time from reading a Kafka request to its response being ready, by API",
            Unit::Seconds,
            self.latency.clone(),
        );
        registry.register(
            "kafka_requests",
            "Kafka requests by API and the error codes their responses carried (one per partition or topic for APIs that answer per partition or topic, as Kafka's ErrorsPerSec)",
            self.requests.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
    use kafka_protocol::messages::produce_response::{
        PartitionProduceResponse, TopicProduceResponse,
    };
    use kafka_protocol::messages::{DeleteTopicsResponse, ProduceResponse};

    fn scrape(metrics: &KafkaMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        text
    }

    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn responses_count_their_error_codes_by_api() {
        let metrics = KafkaMetrics::default();
        let partitions = [0, 0, 6, 6, 0]
            .iter()
            .map(|&c| PartitionProduceResponse::default().with_error_code(c))
            .collect();
        let produce = ProduceResponse::default().with_responses(vec![
            TopicProduceResponse::default().with_partition_responses(partitions),
        ]);
        metrics.responded(ApiKey::Produce as i16, 9, &produce);
        let missing = DeleteTopicsResponse::default()
            .with_responses(vec![DeletableTopicResult::default()
                .with_error_code(ErrorCode::UnknownTopicOrPartition.code())]);
        metrics.responded(ApiKey::DeleteTopics as i16, 4, &missing);
        // An empty answer still counts its request, as NONE.
        metrics.responded(ApiKey::Produce as i16, 9, &ProduceResponse::default());
        // A number Kafka never defined counts as UNKNOWN_SERVER_ERROR.
        let odd = DeleteTopicsResponse::default()
            .with_responses(vec![DeletableTopicResult::default().with_error_code(9999)]);
        metrics.responded(ApiKey::DeleteTopics as i16, 4, &odd);
        let text = scrape(&metrics);
        let at = |api: &str, error: &str| {
            value(
                &text,
                &format!("kafka_requests_total{{api=\"{api}\",error=\"{error}\"}}"),
            )
        };
        assert_eq!(at("Produce", "NONE"), Some(4), "{text}");
        assert_eq!(at("Produce", "NOT_LEADER_OR_FOLLOWER"), Some(2), "{text}");
        assert_eq!(
            at("DeleteTopics", "UNKNOWN_TOPIC_OR_PARTITION"),
            Some(1),
            "{text}"
        );
        assert_eq!(
            at("DeleteTopics", "UNKNOWN_SERVER_ERROR"),
            Some(1),
            "{text}"
        );
        // Every API served shows NONE from the start, and nothing else does.
        assert_eq!(at("Fetch", "NONE"), Some(0), "{text}");
        assert_eq!(at("DeleteTopics", "NONE"), Some(0), "{text}");
    }
}
