//! The operator's view and controls of the AMQP objects (the HTTP API and the
//! `sluice queue|exchange|binding` commands): the same operations channels run
//! (`ops.rs`), as the operator, who sees every queue, exclusive ones included.

use std::collections::BTreeMap;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use serde::Serialize;
use sluice_topology::amqp::{AmqpCommand, Binding, Destination, PREDECLARED_EXCHANGES};

use crate::error::AmqpError;
use crate::model::{decode_table, value_int, value_text};
use crate::ops::{ExchangeDeclaration, QueueDeclaration, Who};
use crate::queue::{Outcome, QueueHandle, QueueStatus};
use crate::{Broker, NODE_SESSION};

/// How long the operator's listing waits for another node's counts of a queue
/// it leads (a paused or cut-off leader must not hold the listing).
const OBSERVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Handle on the AMQP objects of a node, for the operator.
#[derive(Clone)]
pub struct AmqpAdmin {
    pub(crate) broker: Arc<Broker>,
}

/// A refused operation: RabbitMQ's reply code and text.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct AdminError {
    /// 403, 404, 405, 406 as RabbitMQ answers; 5xx for connection-level codes.
    pub code: u16,
    pub text: String,
}

impl From<AmqpError> for AdminError {
    fn from(e: AmqpError) -> AdminError {
        AdminError {
            code: e.reply_code(),
            text: e.text,
        }
    }
}

/// One queue, with its counts on its leader (zero where it is led elsewhere).
#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    pub vhost: String,
    pub name: String,
    /// The topic holding its messages.
    pub topic: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    pub arguments: BTreeMap<String, String>,
    /// The node leading its topic (-1: none).
    pub leader: i32,
    /// Whether this node leads it (the counts below are this node's).
    pub served_here: bool,
    pub messages_ready: u32,
    pub messages_unacknowledged: u32,
    pub consumers: u32,
    pub published_total: u64,
    pub delivered_total: u64,
    pub acked_total: u64,
    /// Per second, since the previous sample at least a second earlier.
    pub publish_rate: f64,
    pub deliver_rate: f64,
    pub ack_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VhostInfo {
    pub name: String,
    pub queues: usize,
    pub exchanges: usize,
    /// Users with permissions on it.
    pub users: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExchangeInfo {
    pub vhost: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BindingInfo {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: String,
    pub routing_key: String,
    pub arguments: BTreeMap<String, String>,
}

/// A message taken with `get`.
#[derive(Debug, Clone, Serialize)]
pub struct GotMessage {
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    /// The body as UTF-8 (invalid sequences replaced).
    pub payload: String,
    pub payload_bytes: usize,
    pub message_count: u32,
}

/// An exchange as the operator declares it.
#[derive(Debug, Clone)]
pub struct ExchangeSpec {
    /// `direct`, `fanout`, `topic` or `headers`.
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTableText,
}

/// A binding as the operator names it.
#[derive(Debug, Clone)]
pub struct BindingSpec {
    pub source: String,
    pub destination: String,
    pub kind: DestinationKind,
    pub routing_key: String,
    pub arguments: FieldTableText,
}

impl BindingSpec {
    fn binding(&self) -> Binding {
        Binding {
            source: self.source.clone(),
            destination: match self.kind {
                DestinationKind::Queue => Destination::Queue(self.destination.clone()),
                DestinationKind::Exchange => Destination::Exchange(self.destination.clone()),
            },
            routing_key: self.routing_key.clone(),
            arguments: crate::model::encode_table(&self.arguments.table()),
        }
    }
}

/// Where a binding leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationKind {
    Queue,
    Exchange,
}

fn render(t: &FieldTable) -> BTreeMap<String, String> {
    t.inner()
        .iter()
        .map(|(k, v)| {
            let text = value_int(v)
                .map(|i| i.to_string())
                .or_else(|| value_text(v))
                .unwrap_or_else(|| match v {
                    AMQPValue::Boolean(b) => b.to_string(),
                    other => format!("{other:?}"),
                });
            (k.as_str().to_owned(), text)
        })
        .collect()
}

/// Arguments as the operator writes them: integers become long integers,
/// `true`/`false` booleans, anything else a long string (as rabbitmqadmin sends
/// them).
#[derive(Debug, Clone, Default)]
pub struct FieldTableText(pub BTreeMap<String, String>);

impl FieldTableText {
    fn table(&self) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in &self.0 {
            let value = if let Ok(i) = v.parse::<i64>() {
                AMQPValue::LongLongInt(i)
            } else if v == "true" || v == "false" {
                AMQPValue::Boolean(v == "true")
            } else {
                AMQPValue::LongString(v.as_bytes().to_vec().into())
            };
            t.insert(k.as_str().into(), value);
        }
        t
    }
}

impl AmqpAdmin {
    /// Every virtual host with its object counts.
    pub fn vhosts(&self) -> Vec<VhostInfo> {
        let image = self.broker.topology.image();
        image
            .amqp
            .vhosts
            .iter()
            .map(|(name, v)| VhostInfo {
                name: name.clone(),
                queues: v.queues.len(),
                exchanges: v.exchanges.len() + PREDECLARED_EXCHANGES.len(),
                users: image
                    .access
                    .users
                    .iter()
                    .filter(|(_, u)| u.permissions.contains_key(name))
                    .map(|(n, _)| n.clone())
                    .collect(),
            })
            .collect()
    }

    /// Creates a virtual host (an existing one is fine).
    pub async fn create_vhost(&self, name: &str) -> Result<(), AdminError> {
        let cmd = AmqpCommand::CreateVhost {
            name: name.to_owned(),
        };
        Ok(self.broker.propose(cmd, &format!("vhost '{name}'")).await?)
    }

    /// Deletes a virtual host with everything in it: its queues' actors stop
    /// with their topics (consumers are sent `basic.cancel`), and nobody keeps
    /// permissions on it.
    pub async fn delete_vhost(&self, name: &str) -> Result<(), AdminError> {
        let cmd = AmqpCommand::DeleteVhost {
            name: name.to_owned(),
        };
        Ok(self.broker.propose(cmd, &format!("vhost '{name}'")).await?)
    }

    /// Every queue of every virtual host, by name.
    pub async fn queues(&self) -> Vec<QueueInfo> {
        self.queues_counted(true).await
    }

    /// Every queue this node leads, with its counts: what this node's
    /// metrics show (each node shows its own, so no node asks another).
    pub async fn queues_led_here(&self) -> Vec<QueueInfo> {
        let mut led = self.queues_counted(false).await;
        led.retain(|q| q.served_here);
        led
    }

    /// Every queue; the counts of those led elsewhere asked of their
    /// leaders when `ask_leaders`, zero otherwise.
    async fn queues_counted(&self, ask_leaders: bool) -> Vec<QueueInfo> {
        let image = self.broker.topology.image();
        let me = self.broker.topology.node_id();
        let mut out = Vec::new();
        let mut unreachable = std::collections::BTreeSet::new();
        for (vhost, v) in &image.amqp.vhosts {
            for (name, q) in &v.queues {
                let leader = image
                    .topics
                    .get(&q.topic)
                    .and_then(|t| t.partitions.first())
                    .map_or(-1, |p| p.leader);
                let link = (leader == me)
                    .then(|| self.broker.local_queue(vhost, name).ok())
                    .flatten();
                // A queue led elsewhere: its leader counts, unless it did not
                // answer for another queue of this listing already.
                let ask = ask_leaders && leader >= 0 && !unreachable.contains(&leader);
                let remote = match (&link, ask) {
                    (None, true) => match self.broker.queue_for(NODE_SESSION, vhost, name) {
                        Ok(QueueHandle::There(r)) => {
                            match tokio::time::timeout(OBSERVE_TIMEOUT, r.observe()).await {
                                Ok(Ok(observed)) => Some(observed),
                                _ => {
                                    unreachable.insert(leader);
                                    None
                                }
                            }
                        }
                        _ => None,
                    },
                    _ => None,
                };
                let (status, traffic) = match (&link, remote) {
                    (Some(l), _) => (l.peek().await.unwrap_or_default(), l.traffic()),
                    (None, Some(observed)) => observed,
                    (None, None) => (QueueStatus::default(), Default::default()),
                };
                out.push(QueueInfo {
                    vhost: vhost.clone(),
                    name: name.clone(),
                    topic: q.topic.clone(),
                    durable: q.durable,
                    auto_delete: q.auto_delete,
                    exclusive: q.exclusive_owner.is_some(),
                    arguments: render(&decode_table(&q.arguments)),
                    leader,
                    served_here: link.is_some(),
                    messages_ready: status.ready,
                    messages_unacknowledged: status.unacked,
                    consumers: status.consumers,
                    published_total: traffic.totals[0],
                    delivered_total: traffic.totals[1],
                    acked_total: traffic.totals[2],
                    publish_rate: traffic.rates[0],
                    deliver_rate: traffic.rates[1],
                    ack_rate: traffic.rates[2],
                });
            }
        }
        out
    }

    pub async fn declare_queue(
        &self,
        vhost: &str,
        name: &str,
        durable: bool,
        auto_delete: bool,
        arguments: &FieldTableText,
    ) -> Result<(), AdminError> {
        let table = arguments.table();
        let d = QueueDeclaration {
            name,
            passive: false,
            durable,
            exclusive: false,
            auto_delete,
            arguments: &table,
        };
        self.broker.declare_queue(vhost, d, Who::Operator).await?;
        Ok(())
    }

    /// Deletes a queue; returns the ready messages it held.
    pub async fn delete_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AdminError> {
        self.broker.queue_state(vhost, name, Who::Operator)?;
        Ok(self
            .broker
            .delete_queue_checked(vhost, name, if_unused, if_empty, Who::Operator)
            .await?)
    }

    /// Removes the ready messages; returns how many.
    pub async fn purge_queue(&self, vhost: &str, name: &str) -> Result<u32, AdminError> {
        Ok(self.broker.purge_queue(vhost, name, Who::Operator).await?)
    }

    /// Takes up to `count` messages, then acknowledges them or (`requeue`) puts
    /// them back, flagged redelivered, as rabbitmqadmin's `get` does.
    pub async fn get(
        &self,
        vhost: &str,
        name: &str,
        count: usize,
        requeue: bool,
    ) -> Result<Vec<GotMessage>, AdminError> {
        self.broker.queue_state(vhost, name, Who::Operator)?;
        let link = self.broker.queue_for(NODE_SESSION, vhost, name)?;
        let mut out = Vec::new();
        let mut offsets = Vec::new();
        for _ in 0..count {
            let Some(got) = link.get(false).await? else {
                break;
            };
            offsets.push(got.message.offset);
            out.push(GotMessage {
                exchange: got.message.exchange.clone(),
                routing_key: got.message.routing_key.clone(),
                redelivered: got.redelivered,
                payload: String::from_utf8_lossy(&got.message.body).into_owned(),
                payload_bytes: got.message.body.len(),
                message_count: got.remaining,
            });
        }
        let outcome = if requeue {
            Outcome::Requeue
        } else {
            Outcome::Ack
        };
        link.settle(offsets, outcome);
        Ok(out)
    }

    /// Every exchange, the predeclared ones included.
    pub fn exchanges(&self) -> Vec<ExchangeInfo> {
        let image = self.broker.topology.image();
        let mut out = Vec::new();
        for vhost in image.amqp.vhosts.keys() {
            for (name, kind) in PREDECLARED_EXCHANGES {
                out.push(ExchangeInfo {
                    vhost: vhost.to_owned(),
                    name: name.to_owned(),
                    kind: kind.to_owned(),
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: BTreeMap::new(),
                });
            }
            if let Some(v) = image.vhost(vhost) {
                for (name, e) in &v.exchanges {
                    out.push(ExchangeInfo {
                        vhost: vhost.to_owned(),
                        name: name.clone(),
                        kind: e.kind.clone(),
                        durable: e.durable,
                        auto_delete: e.auto_delete,
                        internal: e.internal,
                        arguments: render(&decode_table(&e.arguments)),
                    });
                }
            }
        }
        out
    }

    pub async fn declare_exchange(
        &self,
        vhost: &str,
        name: &str,
        spec: &ExchangeSpec,
    ) -> Result<(), AdminError> {
        let table = spec.arguments.table();
        let d = ExchangeDeclaration {
            name,
            kind: &spec.kind,
            passive: false,
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            internal: spec.internal,
            arguments: &table,
        };
        Ok(self.broker.declare_exchange(vhost, d).await?)
    }

    pub async fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), AdminError> {
        Ok(self.broker.delete_exchange(vhost, name, false).await?)
    }

    pub fn bindings(&self) -> Vec<BindingInfo> {
        let image = self.broker.topology.image();
        let mut out = Vec::new();
        for (vhost, v) in &image.amqp.vhosts {
            for b in &v.bindings {
                let (destination, kind) = match &b.destination {
                    Destination::Queue(q) => (q.clone(), "queue"),
                    Destination::Exchange(x) => (x.clone(), "exchange"),
                };
                out.push(BindingInfo {
                    vhost: vhost.clone(),
                    source: b.source.clone(),
                    destination,
                    destination_type: kind.to_owned(),
                    routing_key: b.routing_key.clone(),
                    arguments: render(&decode_table(&b.arguments)),
                });
            }
        }
        out
    }

    pub async fn bind(&self, vhost: &str, spec: &BindingSpec) -> Result<(), AdminError> {
        Ok(self
            .broker
            .bind(vhost, spec.binding(), Who::Operator)
            .await?)
    }

    pub async fn unbind(&self, vhost: &str, spec: &BindingSpec) -> Result<(), AdminError> {
        Ok(self.broker.unbind(vhost, spec.binding()).await?)
    }
}
