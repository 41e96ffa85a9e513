//! The AMQP 0-9-1 model the quorum keeps: per virtual host, the exchanges, the
//! queues (each backed by a one-partition topic) and the bindings between them.
//!
//! Pure data like the rest of the image: exchange and queue arguments are kept as
//! the AMQP field-table bytes the front end encoded, so this crate knows no wire
//! format. What a declaration *means* (equivalence, routing, `x-` arguments) is the
//! front end's; what exists, and that a queue and its topic are created and deleted
//! together, is decided here, in log order.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::image::{CommandError, CommandOutput, CommandResult, MetadataImage};

/// The AMQP objects of every virtual host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmqpModel {
    /// Virtual hosts by name.
    pub vhosts: BTreeMap<String, Vhost>,
}

/// One virtual host's objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vhost {
    /// The log index that created it: a virtual host deleted and created
    /// again is another one (0: created before this was recorded, or
    /// implicitly).
    #[serde(default)]
    pub since: u64,
    /// Declared exchanges by name (the default and `amq.*` exchanges are implicit).
    pub exchanges: BTreeMap<String, ExchangeState>,
    /// Queues by name.
    pub queues: BTreeMap<String, QueueState>,
    /// Bindings of exchanges to queues (and to exchanges).
    pub bindings: BTreeSet<Binding>,
}

/// A declared exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeState {
    /// `direct`, `fanout`, `topic` or `headers`.
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    /// The declaration's arguments, an encoded AMQP field table.
    pub arguments: Vec<u8>,
}

/// A declared queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The topic that holds its messages (partition 0).
    pub topic: String,
    pub durable: bool,
    pub auto_delete: bool,
    /// The connection that owns an exclusive queue (`node:incarnation:connection`).
    pub exclusive_owner: Option<String>,
    /// The process that declared it (`node:incarnation`): a transient queue goes
    /// when its node restarts.
    pub declared_by: String,
    /// The declaration's arguments, an encoded AMQP field table.
    pub arguments: Vec<u8>,
    /// A stream queue declared over an existing topic (a Kafka topic read over
    /// AMQP): the queue does not own it, so deleting the queue leaves the topic.
    #[serde(default)]
    pub attached: bool,
}

/// What a binding connects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Destination {
    Queue(String),
    Exchange(String),
}

/// A binding from an exchange to a queue or an exchange.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Binding {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    /// Encoded AMQP field table (the headers exchange matches on it).
    pub arguments: Vec<u8>,
}

/// A change to the AMQP model. Objects are declared in a virtual host that
/// exists (RESOURCE_NOT_FOUND otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AmqpCommand {
    /// Creates a virtual host unless it exists.
    CreateVhost { name: String },
    /// Removes a virtual host with its exchanges, queues (and their topics),
    /// bindings, and every user's permissions on it.
    DeleteVhost { name: String },
    /// Creates the exchange unless it exists (an existing one is left as it is).
    DeclareExchange {
        vhost: String,
        name: String,
        exchange: ExchangeState,
    },
    /// Removes the exchange and every binding from or to it.
    DeleteExchange { vhost: String, name: String },
    /// Creates the queue and its topic unless the queue exists (an existing one is
    /// left as it is). TOPIC_ALREADY_EXISTS when its topic exists without it; for
    /// an `attached` queue the topic must exist instead (UNKNOWN_TOPIC_OR_PARTITION).
    DeclareQueue {
        vhost: String,
        name: String,
        queue: QueueState,
        replication_factor: i16,
        topic_configs: BTreeMap<String, String>,
    },
    /// Removes the queue, its bindings and its topic.
    DeleteQueue { vhost: String, name: String },
    /// Adds a binding; UNKNOWN_TOPIC_OR_PARTITION when either end is missing.
    Bind { vhost: String, binding: Binding },
    /// Removes a binding (missing is fine, as in RabbitMQ).
    Unbind { vhost: String, binding: Binding },
}

/// The virtual host created with the default user, and the one an entry of an
/// older log declared into.
pub const DEFAULT_VHOST: &str = "/";

/// Exchanges every virtual host has without declaring them: the default exchange
/// (`""`) and the `amq.*` ones.
pub const PREDECLARED_EXCHANGES: [(&str, &str); 6] = [
    ("", "direct"),
    ("amq.direct", "direct"),
    ("amq.fanout", "fanout"),
    ("amq.topic", "topic"),
    ("amq.headers", "headers"),
    ("amq.match", "headers"),
];

impl Vhost {
    /// Whether the exchange exists (declared or predeclared).
    pub fn has_exchange(&self, name: &str) -> bool {
        self.exchanges.contains_key(name) || PREDECLARED_EXCHANGES.iter().any(|(n, _)| *n == name)
    }

    /// The exchange's kind, declared or predeclared.
    pub fn exchange_kind(&self, name: &str) -> Option<&str> {
        if let Some(e) = self.exchanges.get(name) {
            return Some(&e.kind);
        }
        PREDECLARED_EXCHANGES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, k)| *k)
    }

    fn has_destination(&self, d: &Destination) -> bool {
        match d {
            Destination::Queue(q) => self.queues.contains_key(q),
            Destination::Exchange(e) => self.has_exchange(e),
        }
    }
}

impl MetadataImage {
    /// A virtual host's objects, if it has any.
    pub fn vhost(&self, name: &str) -> Option<&Vhost> {
        self.amqp.vhosts.get(name)
    }

    /// A topic is gone (deleted over Kafka): so is any queue it backed.
    pub(crate) fn forget_queues_of(&mut self, topic: &str) {
        for v in self.amqp.vhosts.values_mut() {
            let gone: Vec<String> = v
                .queues
                .iter()
                .filter(|(_, q)| q.topic == topic)
                .map(|(n, _)| n.clone())
                .collect();
            for name in gone {
                v.queues.remove(&name);
                let d = Destination::Queue(name);
                v.bindings.retain(|b| b.destination != d);
            }
        }
    }

    fn existing_vhost(&mut self, name: &str) -> Result<&mut Vhost, CommandError> {
        // Entries written before vhosts were explicit (an older release's log,
        // replayed after its snapshot) declared into `/` without creating it.
        // Until the default vhost and user are initialized, `/` still comes
        // into being that way, so such a log applies as it always did.
        if name == DEFAULT_VHOST && !self.access.initialized {
            return Ok(self.amqp.vhosts.entry(name.to_owned()).or_default());
        }
        self.amqp
            .vhosts
            .get_mut(name)
            .ok_or_else(|| CommandError::NotFound(format!("no vhost '{name}'")))
    }

    pub(crate) fn apply_amqp(&mut self, index: u64, cmd: &AmqpCommand) -> CommandResult {
        match cmd {
            AmqpCommand::CreateVhost { name } => {
                crate::access::validate_name("vhost", name)?;
                self.amqp
                    .vhosts
                    .entry(name.clone())
                    .or_insert_with(|| Vhost {
                        since: index,
                        ..Vhost::default()
                    });
                Ok(CommandOutput::Done)
            }
            AmqpCommand::DeleteVhost { name } => {
                let v = self
                    .amqp
                    .vhosts
                    .remove(name)
                    .ok_or_else(|| CommandError::NotFound(format!("no vhost '{name}'")))?;
                for q in v.queues.values().filter(|q| !q.attached) {
                    self.topics.remove(&q.topic);
                }
                self.forget_permissions_on(name);
                Ok(CommandOutput::Done)
            }
            AmqpCommand::DeclareExchange {
                vhost,
                name,
                exchange,
            } => {
                let v = self.existing_vhost(vhost)?;
                if !v.has_exchange(name) {
                    v.exchanges.insert(name.clone(), exchange.clone());
                }
                Ok(CommandOutput::Done)
            }
            AmqpCommand::DeleteExchange { vhost, name } => {
                let v = self.existing_vhost(vhost)?;
                v.exchanges
                    .remove(name)
                    .ok_or(CommandError::UnknownTopicOrPartition)?;
                let gone = Destination::Exchange(name.clone());
                v.bindings
                    .retain(|b| b.source != *name && b.destination != gone);
                Ok(CommandOutput::Done)
            }
            AmqpCommand::DeclareQueue {
                vhost,
                name,
                queue,
                replication_factor,
                topic_configs,
            } => {
                if self.existing_vhost(vhost)?.queues.contains_key(name) {
                    return Ok(CommandOutput::Done);
                }
                let created = if queue.attached {
                    if !self.topics.contains_key(&queue.topic) {
                        return Err(CommandError::UnknownTopicOrPartition);
                    }
                    CommandOutput::Done
                } else {
                    self.create_topic(index, &queue.topic, 1, *replication_factor, topic_configs)?
                };
                self.existing_vhost(vhost)?
                    .queues
                    .insert(name.clone(), queue.clone());
                Ok(created)
            }
            AmqpCommand::DeleteQueue { vhost, name } => {
                let v = self.existing_vhost(vhost)?;
                let q = v
                    .queues
                    .remove(name)
                    .ok_or(CommandError::UnknownTopicOrPartition)?;
                let gone = Destination::Queue(name.clone());
                v.bindings.retain(|b| b.destination != gone);
                if !q.attached {
                    self.topics.remove(&q.topic);
                }
                Ok(CommandOutput::Done)
            }
            AmqpCommand::Bind { vhost, binding } => {
                let v = self.existing_vhost(vhost)?;
                if !v.has_exchange(&binding.source) || !v.has_destination(&binding.destination) {
                    return Err(CommandError::UnknownTopicOrPartition);
                }
                v.bindings.insert(binding.clone());
                Ok(CommandOutput::Done)
            }
            AmqpCommand::Unbind { vhost, binding } => {
                if let Some(v) = self.amqp.vhosts.get_mut(vhost) {
                    v.bindings.remove(binding);
                }
                Ok(CommandOutput::Done)
            }
        }
    }
}
