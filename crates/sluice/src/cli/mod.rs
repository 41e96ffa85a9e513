//! Client commands. They speak only the Kafka protocol (librdkafka through
//! rdkafka), so they work against Sluice and against any Kafka cluster; the
//! requests librdkafka has no API for (the transaction admin APIs of
//! [`transaction`] and the producer state in `topic describe`) go through
//! sluice-client ([`Wire`]). The exceptions are [`cluster`] (`sluice
//! cluster|partition|node`), [`amqp`] (`sluice queue|exchange|binding`) and
//! [`access`] (`sluice user|vhost|permission`), which use a Sluice node's HTTP
//! admin port.

pub mod access;
pub mod amqp;
pub mod bench;
pub mod cluster;
pub mod consume;
pub mod group;
pub mod job;
pub mod produce;
pub mod topic;
pub mod transaction;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use kafka_protocol::messages::{ApiKey, MetadataRequest};
use kafka_protocol::protocol::Request;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;
use rdkafka::ClientConfig;
use sluice_client::Connection;

/// Timeout of one metadata, admin or offsets request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection options shared by every client command.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Kafka bootstrap server(s), comma separated.
    #[arg(
        long,
        env = "SLUICE_BOOTSTRAP",
        default_value = "127.0.0.1:9092",
        value_name = "HOST:PORT",
        global = true
    )]
    pub bootstrap: String,
    /// Extra librdkafka client property (e.g. -X security.protocol=SSL); repeatable.
    #[arg(short = 'X', long = "client-config", value_name = "KEY=VALUE",
          value_parser = parse_kv, global = true)]
    pub client_config: Vec<(String, String)>,
}

impl ClientArgs {
    /// A librdkafka configuration with the bootstrap servers and the -X properties.
    pub fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "sluice-cli");
        for (k, v) in &self.client_config {
            config.set(k, v);
        }
        config
    }

    /// A consumer used only for metadata, watermarks and offset look-ups:
    /// it never subscribes, and never asks the broker to auto-create topics.
    pub fn lookup_consumer(&self, group: Option<&str>) -> Result<BaseConsumer> {
        let mut config = self.config();
        config
            .set("allow.auto.create.topics", "false")
            .set("enable.auto.commit", "false");
        if let Some(group) = group {
            config.set("group.id", group);
        }
        config
            .create()
            .with_context(|| format!("cannot create a Kafka client for {}", self.bootstrap))
    }
}

/// Client id of the requests sent through [`Wire`].
const WIRE_CLIENT_ID: &str = "sluice-cli";

/// Kafka requests through sluice-client, for the APIs librdkafka has no
/// admin call for: one connection per broker address, opened on first use
/// and dropped when a call on it fails (it is unusable then).
pub struct Wire {
    bootstrap: String,
    conns: HashMap<String, Connection>,
}

impl Wire {
    /// sluice-client speaks plaintext only: -X properties that ask for TLS
    /// or SASL are refused rather than silently ignored.
    pub fn new(client: &ClientArgs) -> Result<Wire> {
        for (k, v) in &client.client_config {
            if k == "security.protocol" && !v.eq_ignore_ascii_case("plaintext") {
                bail!("-X {k}={v}: this command speaks plaintext Kafka only");
            }
        }
        Ok(Wire {
            bootstrap: client.bootstrap.clone(),
            conns: HashMap::new(),
        })
    }

    /// Every broker's advertised `host:port`, by node id.
    pub async fn brokers(&mut self) -> Result<BTreeMap<i32, String>> {
        // v1 on, an empty topic list asks for the brokers only.
        let req = MetadataRequest::default().with_topics(Some(Vec::new()));
        let resp = self.call_any(&req, 1, 12).await?;
        Ok(resp
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
            .collect())
    }

    /// Sends `req` to the first bootstrap server that answers, at the
    /// highest version in `min..=max` both sides speak.
    pub async fn call_any<R: Request>(
        &mut self,
        req: &R,
        min: i16,
        max: i16,
    ) -> Result<R::Response> {
        self.call_at(None, req, min, max).await
    }

    /// [`Wire::call_any`] to the broker at `addr`.
    pub async fn call<R: Request>(
        &mut self,
        addr: &str,
        req: &R,
        min: i16,
        max: i16,
    ) -> Result<R::Response> {
        self.call_at(Some(addr), req, min, max).await
    }

    async fn call_at<R: Request>(
        &mut self,
        addr: Option<&str>,
        req: &R,
        min: i16,
        max: i16,
    ) -> Result<R::Response> {
        let api = ApiKey::try_from(R::KEY).map_err(|()| anyhow!("unknown api key {}", R::KEY))?;
        let key = addr.unwrap_or(&self.bootstrap).to_owned();
        let conn = match self.conns.entry(key.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let conn = match addr {
                    Some(addr) => Connection::connect(addr, WIRE_CLIENT_ID, REQUEST_TIMEOUT).await,
                    None => {
                        Connection::connect_any(&self.bootstrap, WIRE_CLIENT_ID, REQUEST_TIMEOUT)
                            .await
                    }
                };
                // The error names the address and the cause already (its
                // source again would repeat the cause).
                e.insert(conn.map_err(|err| anyhow!("{err}"))?)
            }
        };
        let version = conn
            .versions()
            .pick(api, min, max)
            .with_context(|| format!("broker {key}"))?;
        let resp = conn.call_within(req, version, REQUEST_TIMEOUT).await;
        if resp.is_err() {
            self.conns.remove(&key);
        }
        resp.with_context(|| format!("{api:?} to {key} failed"))
    }
}

/// `KEY=VALUE` (value may contain '='; it may be empty).
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Metadata of every topic. Asking for all topics (rather than one by name)
/// is deliberate: a named request may auto-create the topic on brokers that
/// allow it, and a look-up must not create anything.
pub fn all_metadata(consumer: &BaseConsumer) -> Result<Metadata> {
    consumer
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .context("cannot fetch cluster metadata")
}

/// The partition ids of `topic`, sorted; an error when the topic is unknown.
pub fn topic_partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
    let metadata = all_metadata(consumer)?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        bail!("topic {topic:?} does not exist");
    };
    if let Some(err) = t.error() {
        bail!("topic {topic:?}: {:?}", err);
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// A records counter drawn on stderr when stdout is a terminal (a person is
/// watching), hidden when output goes to a pipe or file.
pub fn progress(verb: &str) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let template = format!("{{spinner}} {{human_pos}} records {verb} ({{rate}}) {{elapsed}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        ));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_pairs() {
        assert_eq!(parse_kv("a=b").unwrap(), ("a".into(), "b".into()));
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_kv("a=").unwrap(), ("a".into(), "".into()));
        assert!(parse_kv("=b").is_err());
        assert!(parse_kv("ab").is_err());
    }
}
