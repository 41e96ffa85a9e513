//! Declarations as operations of the broker: declare, delete, purge, bind and
//! unbind, with RabbitMQ's checks and errors. Channels call them on behalf of a
//! connection (`Who::Connection`, which exclusive queues check); the operators'
//! API calls them as `Who::Operator`. Written once, for both.

use std::collections::BTreeMap;
use std::sync::Arc;

use amq_protocol::types::FieldTable;
use sluice_topology::amqp::{
    AmqpCommand, Binding, Destination, ExchangeState, QueueState, PREDECLARED_EXCHANGES,
};

use crate::error::AmqpError;
use crate::model::{
    encode_table, queue_arguments, queue_mismatch, queue_topic, same_exchange, QueueKind,
};
use crate::queue::QueueStatus;
use crate::{no_queue, Broker};

/// Who asks: exclusive queues are their connection's alone.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Who<'a> {
    /// A client connection: its owner tag, and its id (its peer sessions).
    Connection { owner: &'a str, id: u64 },
    /// The operator (HTTP API, CLI): sees and changes every queue.
    Operator,
}

impl Who<'_> {
    /// The peer sessions this asker's queue operations go through: a
    /// connection's own, so they stay in order with its consumers' cancels and
    /// acknowledgements.
    fn session(&self) -> u64 {
        match self {
            Who::Connection { id, .. } => *id,
            Who::Operator => crate::NODE_SESSION,
        }
    }
}

/// A queue declaration.
pub(crate) struct QueueDeclaration<'a> {
    /// Empty: a server-named queue (`amq.gen-…`).
    pub name: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: &'a FieldTable,
}

/// An exchange declaration.
pub(crate) struct ExchangeDeclaration<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: &'a FieldTable,
}

/// What a queue declaration did.
pub(crate) struct Declared {
    pub name: String,
    /// This declaration created it.
    pub created: bool,
    pub status: QueueStatus,
}

pub(crate) fn no_exchange(vhost: &str, name: &str) -> AmqpError {
    AmqpError::not_found(format!("no exchange '{name}' in vhost '{vhost}'"))
}

fn predeclared(name: &str) -> Option<&'static str> {
    PREDECLARED_EXCHANGES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
}

/// Exchange kinds Sluice routes.
pub(crate) const EXCHANGE_KINDS: [&str; 4] = ["direct", "fanout", "topic", "headers"];

impl Broker {
    pub(crate) fn check_exclusive(
        &self,
        vhost: &str,
        name: &str,
        q: &QueueState,
        who: Who<'_>,
    ) -> Result<(), AmqpError> {
        match (&q.exclusive_owner, who) {
            (Some(owner), Who::Connection { owner: me, .. }) if owner != me => Err(AmqpError::locked(format!(
                "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
            ))),
            _ => Ok(()),
        }
    }

    /// The queue as the image has it, if `who` may use it.
    pub(crate) fn queue_state(
        &self,
        vhost: &str,
        name: &str,
        who: Who<'_>,
    ) -> Result<QueueState, AmqpError> {
        let image = self.topology.image();
        let q = image
            .vhost(vhost)
            .and_then(|v| v.queues.get(name))
            .cloned()
            .ok_or_else(|| no_queue(vhost, name))?;
        self.check_exclusive(vhost, name, &q, who)?;
        Ok(q)
    }

    /// The queue's counts, zero when it is not served here.
    pub(crate) async fn queue_status(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
        who: Who<'_>,
    ) -> QueueStatus {
        match self.queue_for(who.session(), vhost, name) {
            Ok(link) => link.status().await.unwrap_or_default(),
            Err(_) => QueueStatus::default(),
        }
    }

    pub(crate) async fn declare_queue(
        self: &Arc<Self>,
        vhost: &str,
        d: QueueDeclaration<'_>,
        who: Who<'_>,
    ) -> Result<Declared, AmqpError> {
        let mut name = d.name.to_owned();
        if name.is_empty() {
            name = format!("amq.gen-{}", uuid::Uuid::new_v4().simple());
        } else if name.starts_with("amq.") && !d.passive {
            return Err(AmqpError::access_refused(format!(
                "queue name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let image = self.topology.image();
        let existing = image
            .vhost(vhost)
            .and_then(|v| v.queues.get(&name))
            .cloned();
        let mut created = false;
        if d.passive {
            let q = existing.ok_or_else(|| no_queue(vhost, &name))?;
            self.check_exclusive(vhost, &name, &q, who)?;
        } else {
            let args = queue_arguments(&name, vhost, d.arguments)?;
            if args.kind == QueueKind::Stream {
                // A stream is a log read many times over: it outlives its
                // declarer, as RabbitMQ requires.
                let refused = [
                    (!d.durable, "non-durable"),
                    (d.exclusive, "exclusive-owner"),
                    (d.auto_delete, "auto-delete"),
                ];
                if let Some((_, property)) = refused.iter().find(|(bad, _)| *bad) {
                    return Err(AmqpError::precondition(format!(
                        "invalid property '{property}' for queue '{name}' in vhost '{vhost}'"
                    )));
                }
            }
            let check = |q: &QueueState| {
                self.check_exclusive(vhost, &name, q, who)?;
                match queue_mismatch(
                    &name,
                    vhost,
                    q,
                    d.durable,
                    d.auto_delete,
                    d.exclusive,
                    d.arguments,
                ) {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            };
            match existing {
                Some(q) => check(&q)?,
                None => {
                    let owner =
                        match (d.exclusive, who) {
                            (true, Who::Connection { owner: me, .. }) => Some(me.to_owned()),
                            (true, Who::Operator) => return Err(AmqpError::precondition(
                                "an exclusive queue belongs to a connection; declare it over AMQP",
                            )),
                            (false, _) => None,
                        };
                    let topic = match &args.topic {
                        Some(topic) => topic.clone(),
                        None => queue_topic(vhost, &name).ok_or_else(|| {
                            AmqpError::precondition(format!(
                                "queue name '{name}' is too long for its topic name (at most 249 characters once escaped)"
                            ))
                        })?,
                    };
                    if args.topic.is_some() && !image.topics.contains_key(&topic) {
                        return Err(AmqpError::not_found(format!(
                            "no topic '{topic}' for stream queue '{name}' in vhost '{vhost}'"
                        )));
                    }
                    // A queue's topic is its own, and one stream reads a topic:
                    // two queues on one log would consume each other's messages.
                    if args.topic.is_some() {
                        let holder = image.amqp.vhosts.iter().find_map(|(v, vh)| {
                            vh.queues
                                .iter()
                                .find(|(_, q)| q.topic == topic)
                                .map(|(n, _)| (v.clone(), n.clone()))
                        });
                        if let Some((v, n)) = holder {
                            return Err(AmqpError::locked(format!(
                                "topic '{topic}' is already the log of queue '{n}' in vhost '{v}'"
                            )));
                        }
                    }
                    let queue = QueueState {
                        topic,
                        attached: args.topic.is_some(),
                        durable: d.durable,
                        auto_delete: d.auto_delete,
                        exclusive_owner: owner,
                        declared_by: self.process_tag(),
                        arguments: encode_table(d.arguments),
                    };
                    let mut topic_configs = BTreeMap::new();
                    // Messages leave a queue when acknowledged, never by age; a
                    // stream keeps them until its retention drops them.
                    let limit =
                        |v: Option<u64>| v.map_or_else(|| "-1".to_owned(), |v| v.to_string());
                    let (retention_ms, retention_bytes) = match args.kind {
                        QueueKind::Stream => (limit(args.max_age), limit(args.max_length_bytes)),
                        _ => (limit(None), limit(None)),
                    };
                    topic_configs.insert("retention.ms".to_owned(), retention_ms);
                    topic_configs.insert("retention.bytes".to_owned(), retention_bytes);
                    if let Some(segment) = args.segment_bytes {
                        topic_configs.insert("segment.bytes".to_owned(), segment.to_string());
                    }
                    // A batch holds messages up to 1 MiB, or one larger message:
                    // room for the largest body accepted and its properties (at
                    // most one frame).
                    let largest =
                        self.config.max_message_bytes + u64::from(self.config.frame_max) + 4096;
                    topic_configs.insert(
                        "max.message.bytes".to_owned(),
                        largest.min(i32::MAX as u64).to_string(),
                    );
                    self.propose(
                        AmqpCommand::DeclareQueue {
                            vhost: vhost.to_owned(),
                            name: name.clone(),
                            queue,
                            replication_factor: image.default_replication_factor(),
                            topic_configs,
                        },
                        &format!("queue '{name}' in vhost '{vhost}'"),
                    )
                    .await?;
                    let image = self.topology.image();
                    let now = image
                        .vhost(vhost)
                        .and_then(|v| v.queues.get(&name))
                        .ok_or_else(|| no_queue(vhost, &name))?;
                    check(now)?;
                    created = true;
                }
            }
        }
        let status = self.queue_status(vhost, &name, who).await;
        Ok(Declared {
            name,
            created,
            status,
        })
    }

    /// Deletes a queue (`if_unused`, `if_empty` as RabbitMQ checks them); a
    /// missing queue is fine. Returns the ready messages it held.
    pub(crate) async fn delete_queue_checked(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        who: Who<'_>,
    ) -> Result<u32, AmqpError> {
        let image = self.topology.image();
        let Some(q) = image.vhost(vhost).and_then(|v| v.queues.get(name)) else {
            return Ok(0);
        };
        self.check_exclusive(vhost, name, q, who)?;
        let status = self.queue_status(vhost, name, who).await;
        if if_unused && status.consumers > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{vhost}' in use"
            )));
        }
        if if_empty && status.ready + status.unacked > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{vhost}' is not empty"
            )));
        }
        self.delete_queue(vhost, name).await;
        Ok(status.ready)
    }

    pub(crate) async fn purge_queue(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
        who: Who<'_>,
    ) -> Result<u32, AmqpError> {
        self.queue_state(vhost, name, who)?;
        self.queue_for(who.session(), vhost, name)?.purge().await
    }

    pub(crate) async fn declare_exchange(
        &self,
        vhost: &str,
        d: ExchangeDeclaration<'_>,
    ) -> Result<(), AmqpError> {
        let name = d.name;
        let image = self.topology.image();
        let v = image.vhost(vhost);
        if d.passive {
            if v.is_some_and(|v| v.has_exchange(name)) || predeclared(name).is_some() {
                return Ok(());
            }
            return Err(no_exchange(vhost, name));
        }
        if name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if !EXCHANGE_KINDS.contains(&d.kind) {
            return Err(AmqpError::command_invalid(format!(
                "invalid exchange type '{}'",
                d.kind
            )));
        }
        let wanted = ExchangeState {
            kind: d.kind.to_owned(),
            durable: d.durable,
            auto_delete: d.auto_delete,
            internal: d.internal,
            arguments: encode_table(d.arguments),
        };
        if let Some(kind) = predeclared(name) {
            if kind != wanted.kind || !wanted.durable {
                return Err(AmqpError::precondition(format!(
                    "inequivalent arg 'type' for exchange '{name}' in vhost '{vhost}': received '{}' but current is '{kind}'",
                    wanted.kind
                )));
            }
            return Ok(());
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        if let Some(existing) = v.and_then(|v| v.exchanges.get(name)) {
            return check_exchange(vhost, name, existing, &wanted);
        }
        self.propose(
            AmqpCommand::DeclareExchange {
                vhost: vhost.to_owned(),
                name: name.to_owned(),
                exchange: wanted.clone(),
            },
            name,
        )
        .await?;
        let image = self.topology.image();
        match image.vhost(vhost).and_then(|v| v.exchanges.get(name)) {
            Some(now) => check_exchange(vhost, name, now, &wanted),
            None => Ok(()),
        }
    }

    /// Deletes an exchange and its bindings; a missing one is fine.
    pub(crate) async fn delete_exchange(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
    ) -> Result<(), AmqpError> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "operation not permitted on the default exchange or '{name}'"
            )));
        }
        let image = self.topology.image();
        let v = image.vhost(vhost);
        if !v.is_some_and(|v| v.exchanges.contains_key(name)) {
            return Ok(());
        }
        if if_unused && v.is_some_and(|v| v.bindings.iter().any(|b| b.source == name)) {
            return Err(AmqpError::precondition(format!(
                "exchange '{name}' in vhost '{vhost}' in use"
            )));
        }
        let cmd = AmqpCommand::DeleteExchange {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        };
        match self.propose(cmd, name).await {
            Err(e) if e.reply_code() != 404 => Err(e),
            _ => Ok(()),
        }
    }

    pub(crate) async fn bind(
        &self,
        vhost: &str,
        binding: Binding,
        who: Who<'_>,
    ) -> Result<(), AmqpError> {
        let image = self.topology.image();
        let v = image.vhost(vhost);
        if binding.source.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let exchange_exists =
            |n: &str| v.is_some_and(|v| v.has_exchange(n)) || predeclared(n).is_some();
        match &binding.destination {
            Destination::Queue(q) => {
                let queue = v
                    .and_then(|v| v.queues.get(q))
                    .ok_or_else(|| no_queue(vhost, q))?;
                self.check_exclusive(vhost, q, queue, who)?;
            }
            Destination::Exchange(x) => {
                if !exchange_exists(x) {
                    return Err(no_exchange(vhost, x));
                }
            }
        }
        if !exchange_exists(&binding.source) {
            return Err(no_exchange(vhost, &binding.source));
        }
        self.propose(
            AmqpCommand::Bind {
                vhost: vhost.to_owned(),
                binding,
            },
            "binding",
        )
        .await
    }

    pub(crate) async fn unbind(&self, vhost: &str, binding: Binding) -> Result<(), AmqpError> {
        if binding.source.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        self.propose(
            AmqpCommand::Unbind {
                vhost: vhost.to_owned(),
                binding,
            },
            "binding",
        )
        .await
    }
}

fn check_exchange(
    vhost: &str,
    name: &str,
    existing: &ExchangeState,
    wanted: &ExchangeState,
) -> Result<(), AmqpError> {
    if same_exchange(existing, wanted) {
        return Ok(());
    }
    let (what, was, asked) = if existing.kind != wanted.kind {
        ("type", existing.kind.clone(), wanted.kind.clone())
    } else if existing.durable != wanted.durable {
        (
            "durable",
            existing.durable.to_string(),
            wanted.durable.to_string(),
        )
    } else if existing.auto_delete != wanted.auto_delete {
        (
            "auto_delete",
            existing.auto_delete.to_string(),
            wanted.auto_delete.to_string(),
        )
    } else if existing.internal != wanted.internal {
        (
            "internal",
            existing.internal.to_string(),
            wanted.internal.to_string(),
        )
    } else {
        ("arguments", "current".to_owned(), "different".to_owned())
    };
    Err(AmqpError::precondition(format!(
        "inequivalent arg '{what}' for exchange '{name}' in vhost '{vhost}': received '{asked}' but current is '{was}'"
    )))
}
