//! `sluice-amqp`: the AMQP 0-9-1 front end. RabbitMQ clients (pika, aio-pika,
//! lapin, the Java client) connect unmodified; their queues are one-partition
//! topics on the same replicated log as Kafka topics.
//!
//! How it fits: frames and methods are amq-protocol's (`frame.rs` only bounds what
//! is buffered); exchanges, queues and bindings live in the metadata quorum
//! (`sluice_topology::amqp`); a queue's messages are Kafka records of its topic
//! (`message.rs`, so Kafka clients read a queue as a topic) and its delivery state
//! belongs to one task on the topic's leader (`queue.rs`). Like the Kafka front
//! end, this crate is written against [`Topology`] only.
//!
//! A connection: protocol header → `connection.start` (PLAIN and AMQPLAIN) →
//! `tune` (frame_max, channel_max, heartbeat) → `open` (virtual host) → channels.
//! Frames larger than the negotiated `frame_max` close the connection (501) before
//! their payload is read; a content header announcing a body above
//! `max_message_bytes` closes the channel (406) before any body is buffered.
//!
//! Confirms: a message published on a confirming channel is acknowledged once the
//! high watermark of every queue it was routed to covers it: durable under the
//! flush policy on the in-sync replicas.
//!
//! Queue arguments served: message TTLs, `x-expires`, length limits with the
//! three overflow modes, dead-lettering (`x-death` as RabbitMQ writes it), single
//! active consumer, priorities (`queue/ready.rs`). Stream queues (`x-queue-type=stream`, `queue/stream.rs`) are
//! read without consuming, from the position `x-stream-offset` names; with
//! `x-stream-topic` a stream reads (and appends to) an existing Kafka topic, all
//! its partitions. Quorum queues count returns (`x-delivery-count`,
//! `x-delivery-limit`). A queue led by another node of a cluster is used through
//! that node (`peer.rs`). Transactions (`tx.*`) hold publishes and settlements until commit.

mod admin;
mod channel;
mod connection;
mod error;
mod frame;
mod message;
mod model;
mod ops;
mod peer;
mod queue;
mod routing;
mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::types::ShortString;
use parking_lot::Mutex;
use sluice_auth::Credential;
use sluice_topology::access::AccessCommand;
use sluice_topology::amqp::AmqpCommand;
use sluice_topology::{Command, MetadataImage, Topology};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use admin::{
    AdminError, AmqpAdmin, BindingInfo, BindingSpec, DestinationKind, ExchangeInfo, ExchangeSpec,
    FieldTableText, GotMessage, QueueInfo, VhostInfo,
};
pub use model::{queue_topic, DEFAULT_VHOST};
pub use queue::QueueStatus;

use crate::error::AmqpError;
use crate::peer::{PeerClient, RemoteQueue};
use crate::queue::{QueueHandle, QueueLink};
use crate::routing::Router;

/// Settings of the AMQP listener.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    pub listen: SocketAddr,
    /// Largest frame the server accepts and proposes (RabbitMQ: 131072).
    pub frame_max: u32,
    /// Most channels per connection (RabbitMQ: 2047).
    pub channel_max: u16,
    /// Heartbeat interval the server proposes, seconds (RabbitMQ: 60).
    pub heartbeat_secs: u16,
    /// Largest message body accepted (RabbitMQ's `max_message_size`, 16 MiB).
    pub max_message_bytes: u64,
    /// Whether the user `guest` may only connect from loopback (RabbitMQ's
    /// `loopback_users`).
    pub guest_loopback_only: bool,
    /// The user created, with all permissions on the default virtual host,
    /// when the cluster first starts (RabbitMQ's `default_user`/`default_pass`).
    pub default_user: String,
    pub default_pass: String,
}

impl AmqpConfig {
    pub const DEFAULT_FRAME_MAX: u32 = 131_072;
    pub const DEFAULT_CHANNEL_MAX: u16 = 2047;
    pub const DEFAULT_HEARTBEAT_SECS: u16 = 60;
    pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;

    pub fn new(listen: SocketAddr) -> AmqpConfig {
        AmqpConfig {
            listen,
            frame_max: Self::DEFAULT_FRAME_MAX,
            channel_max: Self::DEFAULT_CHANNEL_MAX,
            heartbeat_secs: Self::DEFAULT_HEARTBEAT_SECS,
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
            guest_loopback_only: true,
            default_user: "guest".to_owned(),
            default_pass: "guest".to_owned(),
        }
    }
}

/// Why publishers are held back (RabbitMQ's resource alarms: "low on disk",
/// "low on memory"), or `None` while resources are fine. Whoever watches the
/// node's resources holds the sender.
pub type ResourceAlarm = watch::Receiver<Option<Arc<str>>>;

/// The bound AMQP listener.
pub struct AmqpListener {
    listener: TcpListener,
    config: AmqpConfig,
    alarm: ResourceAlarm,
    broker: std::sync::OnceLock<Arc<Broker>>,
}

impl AmqpListener {
    pub async fn bind(config: AmqpConfig) -> std::io::Result<AmqpListener> {
        let listener = TcpListener::bind(config.listen).await?;
        Ok(AmqpListener {
            listener,
            config,
            alarm: watch::channel(None).1,
            broker: std::sync::OnceLock::new(),
        })
    }

    /// While `alarm` holds a reason, a connection that publishes is blocked: it
    /// is sent `connection.blocked` (if it asked for it) and nothing more is read
    /// from it until the alarm clears, as RabbitMQ does under a memory or disk
    /// alarm. Connections that only consume keep going.
    pub fn with_resource_alarm(mut self, alarm: ResourceAlarm) -> AmqpListener {
        self.alarm = alarm;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// The operator's handle on the AMQP objects this listener serves.
    pub fn admin(&self, topology: Arc<dyn Topology>) -> AmqpAdmin {
        AmqpAdmin {
            broker: self.broker_for(topology),
        }
    }

    fn broker_for(&self, topology: Arc<dyn Topology>) -> Arc<Broker> {
        self.broker
            .get_or_init(|| Broker::new(topology, self.config.clone(), self.alarm.clone()))
            .clone()
    }

    /// Accepts connections until `shutdown` resolves; each is served on its own task.
    pub async fn serve(
        self,
        topology: Arc<dyn Topology>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        let broker = self.broker_for(topology);
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(broker.clone().forget_stale_queues());
        tokio::spawn(broker.clone().initialize_access());
        tokio::spawn(broker.clone().watch_access());
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let _ = socket.set_nodelay(true);
                        tokio::spawn(accept(broker.clone(), socket, peer, stop_rx.clone()));
                    }
                    Err(e) => {
                        warn!("AMQP accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        let _ = stop_tx.send(true);
    }
}

/// Serves an accepted socket: a client's AMQP connection, or another node's
/// peer session (told apart by the first eight bytes).
async fn accept(
    broker: Arc<Broker>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let mut header = [0u8; 8];
    let peeked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.peek(&mut header).await {
                Ok(n) if n >= header.len() => return true,
                Ok(0) | Err(_) => return false,
                // Fewer bytes so far: wait for more.
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await;
    if matches!(peeked, Ok(true)) && header == peer::PEER_HEADER {
        let mut socket = socket;
        if tokio::io::AsyncReadExt::read_exact(&mut socket, &mut header)
            .await
            .is_ok()
        {
            peer::serve(broker, socket).await;
        }
        return;
    }
    connection::serve(broker, socket, peer, stop).await;
}

/// What every connection of one listener shares.
pub(crate) struct Broker {
    pub topology: Arc<dyn Topology>,
    pub config: AmqpConfig,
    pub alarm: ResourceAlarm,
    /// Queue actors on this node, by topic.
    queues: Mutex<HashMap<String, QueueLink>>,
    /// Peer sessions to the nodes that lead queues used here, by the connection
    /// they act for ([`NODE_SESSION`] for the node's own uses) and node.
    peers: Mutex<HashMap<(u64, i32), Arc<PeerClient>>>,
    /// Routing tables by virtual host, for the image they were compiled from.
    routers: Mutex<(u64, HashMap<String, Arc<Router>>)>,
    /// Arguments of queues led elsewhere, by topic, for the image they were
    /// parsed from: a forwarded publish does not parse them again.
    remote_args: Mutex<(u64, HashMap<String, Arc<model::QueueArgs>>)>,
    /// Bumped when a virtual host or a user goes, so connections check whether
    /// theirs did (RabbitMQ closes them).
    access_changes: watch::Sender<u64>,
    /// Names this process: exclusive queues record `node:incarnation:connection`.
    incarnation: u64,
    next_connection: AtomicU64,
}

impl Broker {
    fn new(topology: Arc<dyn Topology>, config: AmqpConfig, alarm: ResourceAlarm) -> Arc<Broker> {
        let incarnation = u64::from_le_bytes(
            uuid::Uuid::new_v4().as_bytes()[..8]
                .try_into()
                .unwrap_or([0; 8]),
        );
        Arc::new(Broker {
            topology,
            config,
            alarm,
            queues: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            routers: Mutex::new((u64::MAX, HashMap::new())),
            remote_args: Mutex::new((u64::MAX, HashMap::new())),
            access_changes: watch::channel(0).0,
            incarnation,
            next_connection: AtomicU64::new(1),
        })
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// This process, as a queue's `declared_by` records it.
    pub(crate) fn process_tag(&self) -> String {
        format!("{}:{}", self.topology.node_id(), self.incarnation)
    }

    /// The owner an exclusive queue of `connection` records.
    pub(crate) fn owner_tag(&self, connection: u64) -> String {
        format!("{}:{connection}", self.process_tag())
    }

    /// The routing table of `vhost` for the current image.
    pub(crate) fn router(&self, vhost: &str) -> Arc<Router> {
        let image = self.topology.image();
        let mut cache = self.routers.lock();
        if cache.0 != image.applied_index {
            *cache = (image.applied_index, HashMap::new());
        }
        cache
            .1
            .entry(vhost.to_owned())
            .or_insert_with(|| Arc::new(Router::compile(image.vhost(vhost))))
            .clone()
    }

    /// A queue as a connection (or, with [`NODE_SESSION`], the node itself)
    /// uses it: its actor here when this node leads it, else its leader through
    /// the connection's peer session to that node.
    pub(crate) fn queue_for(
        self: &Arc<Self>,
        session: u64,
        vhost: &str,
        name: &str,
    ) -> Result<QueueHandle, AmqpError> {
        self.queue_at(session, vhost, name, 0)
    }

    /// The queue as a publish of a message with `routing_key` uses it: a
    /// stream over a topic of several partitions is appended to on the node
    /// leading the key's partition.
    pub(crate) fn queue_for_message(
        self: &Arc<Self>,
        session: u64,
        vhost: &str,
        name: &str,
        routing_key: &str,
    ) -> Result<QueueHandle, AmqpError> {
        let partitions = self.partitions_of(vhost, name);
        self.queue_at(
            session,
            vhost,
            name,
            queue::partition_for(routing_key, partitions),
        )
    }

    /// Whether the image still declares the queue.
    pub(crate) fn declares(&self, vhost: &str, name: &str) -> bool {
        self.topology
            .image()
            .vhost(vhost)
            .is_some_and(|v| v.queues.contains_key(name))
    }

    /// How many partitions a queue's topic has (a queue one; a stream over a
    /// Kafka topic maybe more).
    pub(crate) fn partitions_of(&self, vhost: &str, name: &str) -> usize {
        let image = self.topology.image();
        image
            .vhost(vhost)
            .and_then(|v| v.queues.get(name))
            .and_then(|q| image.topics.get(&q.topic))
            .map_or(1, |t| t.partitions.len())
    }

    /// [`Broker::queue_for`], at the node leading `partition` of the queue's
    /// topic: consumers and operations go to partition 0's leader, publishes
    /// to their partition's.
    pub(crate) fn queue_at(
        self: &Arc<Self>,
        session: u64,
        vhost: &str,
        name: &str,
        partition: usize,
    ) -> Result<QueueHandle, AmqpError> {
        let image = self.topology.image();
        let q = image
            .vhost(vhost)
            .and_then(|v| v.queues.get(name))
            .ok_or_else(|| no_queue(vhost, name))?;
        let leader = image
            .topics
            .get(&q.topic)
            .and_then(|t| t.partitions.get(partition))
            .map(|p| p.leader);
        let me = self.topology.node_id();
        let Some(leader) = leader.filter(|l| *l >= 0 && *l != me) else {
            return self.local_queue(vhost, name).map(QueueHandle::Here);
        };
        let addr = image
            .brokers
            .get(&leader)
            .and_then(|b| b.endpoints.get(AMQP_ENDPOINT))
            .cloned()
            .ok_or_else(|| {
                AmqpError::unavailable(format!(
                    "queue '{name}' in vhost '{vhost}' is led by node {leader}, which registered no AMQP endpoint"
                ))
                .retriable()
            })?;
        let args = {
            let mut cache = self.remote_args.lock();
            if cache.0 != image.applied_index {
                *cache = (image.applied_index, HashMap::new());
            }
            match cache.1.get(&q.topic) {
                Some(a) => a.clone(),
                None => {
                    let a = Arc::new(stored_arguments(vhost, name, q));
                    cache.1.insert(q.topic.clone(), a.clone());
                    a
                }
            }
        };
        let client = {
            let mut peers = self.peers.lock();
            match peers.get(&(session, leader)) {
                Some(c) if c.is_alive() => c.clone(),
                _ => {
                    let max_frame = peer::max_frame(self);
                    let c = PeerClient::open(leader, addr, max_frame);
                    peers.insert((session, leader), c.clone());
                    c
                }
            }
        };
        Ok(QueueHandle::There(RemoteQueue::new(
            client, vhost, name, args,
        )))
    }

    /// The peer sessions a connection has open.
    pub(crate) fn sessions_of(&self, connection: u64) -> Vec<Arc<PeerClient>> {
        self.peers
            .lock()
            .iter()
            .filter(|((c, _), _)| *c == connection)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// A connection closes: its peer sessions end once the leaders have what it
    /// sent, and the leaders return what they delivered through them and was not
    /// acknowledged.
    pub(crate) async fn end_sessions(&self, connection: u64) {
        let ending: Vec<Arc<PeerClient>> = {
            let mut peers = self.peers.lock();
            let mine: Vec<(u64, i32)> = peers
                .keys()
                .filter(|(c, _)| *c == connection)
                .copied()
                .collect();
            peers.retain(|_, p| p.is_alive());
            mine.iter().filter_map(|k| peers.remove(k)).collect()
        };
        futures::future::join_all(ending.iter().map(|p| p.finish())).await;
    }

    /// Appends a routed message to a queue this node leads: where and up to
    /// which offset to wait for it to be committed, or `None` when the queue is
    /// full and refuses it (`x-overflow` reject-publish; with
    /// `reject-publish-dlx` and `dead_letter_refused`, it is dead-lettered).
    pub(crate) fn append_here(
        self: &Arc<Self>,
        link: &QueueLink,
        p: &message::Publication,
        batch: &[u8],
        dead_letter_refused: bool,
    ) -> Result<Option<(sluice_topology::Leadership, i64)>, AmqpError> {
        if link.is_full_for(p.body.len() as u64) {
            if dead_letter_refused && link.args.overflow == model::Overflow::RejectPublishDlx {
                if let Some(dlx) = &link.args.dead_letter_exchange {
                    let key = link
                        .args
                        .dead_letter_routing_key
                        .clone()
                        .unwrap_or_else(|| p.routing_key.clone());
                    let stored = message::Stored {
                        offset: -1,
                        timestamp: message::now_ms(),
                        exchange: p.exchange.clone(),
                        routing_key: p.routing_key.clone(),
                        // Parsed only here: a refusal that dead-letters is rare.
                        properties: message::decode_properties(&p.properties),
                        body: p.body.clone(),
                    };
                    if let Ok(dead) = stored.dead_lettered(&link.name, "maxlen", dlx, &key) {
                        self.store_routed(&link.vhost, &[dead]);
                    }
                }
            }
            return Ok(None);
        }
        let leadership = link.leadership_for(&p.routing_key)?;
        let end = self.append_batch_here(link, &leadership, batch, 1)?;
        Ok(Some((leadership.into_owned(), end)))
    }

    /// Appends `batch` (`messages` messages) to one partition of a queue this
    /// node leads; returns the offset whose commit makes them all durable.
    pub(crate) fn append_batch_here(
        &self,
        link: &QueueLink,
        leadership: &sluice_topology::Leadership,
        batch: &[u8],
        messages: usize,
    ) -> Result<i64, AmqpError> {
        let appended = leadership.append(batch).map_err(|e| {
            AmqpError::unavailable(format!(
                "cannot store message in queue '{}': {e}",
                link.name
            ))
        })?;
        link.count_published(messages);
        Ok(appended.end_offset)
    }

    /// The actor of a queue this node leads, started on first use.
    pub(crate) fn local_queue(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
    ) -> Result<QueueLink, AmqpError> {
        let image = self.topology.image();
        let q = image
            .vhost(vhost)
            .and_then(|v| v.queues.get(name))
            .ok_or_else(|| no_queue(vhost, name))?;
        let mut queues = self.queues.lock();
        if let Some(link) = queues.get(&q.topic).filter(|l| l.is_alive()) {
            return Ok(link.clone());
        }
        let partitions = image.topics.get(&q.topic).map_or(1, |t| t.partitions.len());
        let args = stored_arguments(vhost, name, q);
        let placement = if args.kind == model::QueueKind::Stream {
            queue::Placement::Stream(queue::StreamTopic::new(
                self.topology.clone(),
                &q.topic,
                partitions,
            ))
        } else {
            let Some(leadership) = self.topology.leadership(&q.topic, 0) else {
                let leader = image
                    .topics
                    .get(&q.topic)
                    .and_then(|t| t.partitions.first())
                    .map(|p| p.leader);
                return Err(AmqpError::unavailable(format!(
                    "queue '{name}' in vhost '{vhost}' is led by node {}, not here",
                    leader.map_or_else(|| "none".to_owned(), |l| l.to_string())
                ))
                .retriable());
            };
            queue::Placement::Queue(leadership)
        };
        let delete = {
            let (broker, vhost, name) = (Arc::downgrade(self), vhost.to_owned(), name.to_owned());
            Box::new(move || {
                if let Some(broker) = broker.upgrade() {
                    let (vhost, name) = (vhost.clone(), name.clone());
                    tokio::spawn(async move { broker.delete_queue(&vhost, &name).await });
                }
            })
        };
        let dead_letter = {
            let (broker, vhost) = (Arc::downgrade(self), vhost.to_owned());
            Box::new(move |messages: Vec<message::Publication>| {
                if let Some(broker) = broker.upgrade() {
                    broker.store_routed(&vhost, &messages);
                }
            })
        };
        let spec = queue::QueueSpec {
            name: Arc::from(name),
            vhost: Arc::from(vhost),
            auto_delete: q.auto_delete,
            args,
        };
        let link = queue::start(
            spec,
            placement,
            queue::Hooks {
                delete,
                dead_letter,
            },
        );
        queues.insert(q.topic.clone(), link.clone());
        Ok(link)
    }

    /// Routes `messages` (dead-lettered ones) and appends each to the queues it
    /// reaches on this node. Best effort, as RabbitMQ's dead-lettering: a message
    /// that reaches no queue is dropped.
    pub(crate) fn store_routed(self: &Arc<Self>, vhost: &str, messages: &[message::Publication]) {
        let router = self.router(vhost);
        let image = self.topology.image();
        for m in messages {
            let properties = message::decode_properties(&m.properties);
            let targets = router.route(
                image.vhost(vhost),
                &m.exchange,
                &m.routing_key,
                properties.headers().as_ref(),
            );
            if targets.is_empty() {
                continue;
            }
            let batch = match message::encode_batch(&[m]) {
                Ok(b) => b,
                Err(e) => {
                    warn!("cannot encode a dead-lettered message: {e}");
                    continue;
                }
            };
            for q in targets {
                // Dead letters into a full queue are dropped, never dead-lettered
                // again: a cycle of full queues must not loop.
                let stored = self
                    .queue_for_message(NODE_SESSION, vhost, &q, &m.routing_key)
                    .and_then(|handle| match handle {
                        QueueHandle::Here(link) => {
                            self.append_here(&link, m, &batch, false).map(|_| ())
                        }
                        QueueHandle::There(remote) => {
                            drop(remote.publish(m));
                            Ok(())
                        }
                    });
                if let Err(e) = stored {
                    warn!(queue = %q, vhost, "dead-lettered message not stored: {e}");
                }
            }
        }
    }

    /// Creates the default user and virtual host, once per cluster (as RabbitMQ
    /// does on a fresh node). Every node proposes it until the image says it is
    /// done; the first proposal applied wins.
    async fn initialize_access(self: Arc<Self>) {
        while !self.topology.image().access.initialized {
            let pass = self.config.default_pass.clone();
            let Ok(credential) =
                tokio::task::spawn_blocking(move || Credential::derive(pass.as_bytes())).await
            else {
                return;
            };
            let cmd = Command::Access(AccessCommand::Initialize {
                user: self.config.default_user.clone(),
                credential,
                vhost: DEFAULT_VHOST.to_owned(),
            });
            if let Err(e) = self.topology.propose(cmd).await {
                debug!("default AMQP user not created yet: {}", e.message);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Tells connections when vhosts, users or permissions changed: only
    /// then, so an image change costs connections nothing.
    async fn watch_access(self: Arc<Self>) {
        // Vhosts, users, and who may use which vhost.
        type Access = (Vec<String>, Vec<String>, Vec<(String, String)>);
        let access = |i: &MetadataImage| -> Access {
            let grants = i
                .access
                .users
                .iter()
                .flat_map(|(u, state)| {
                    state
                        .permissions
                        .keys()
                        .map(move |v| (u.clone(), v.clone()))
                })
                .collect();
            (
                i.amqp.vhosts.keys().cloned().collect(),
                i.access.users.keys().cloned().collect(),
                grants,
            )
        };
        let mut changes = self.topology.watch_image();
        let mut before = access(&changes.borrow_and_update());
        while changes.changed().await.is_ok() {
            let now = access(&changes.borrow_and_update());
            if now != before {
                self.access_changes.send_modify(|g| *g += 1);
            }
            before = now;
        }
    }

    /// A connection's subscription to [`Broker::watch_access`].
    pub(crate) fn access_changes(&self) -> watch::Receiver<u64> {
        self.access_changes.subscribe()
    }

    /// A user's stored credential. In a node's first moments, before the quorum
    /// holds the default user, a login waits for it rather than fail.
    pub(crate) async fn credential_of(&self, user: &str) -> Option<Credential> {
        if !self.topology.image().access.initialized {
            sluice_topology::wait_image(&*self.topology, ACCESS_WAIT, |i| i.access.initialized)
                .await;
        }
        let image = self.topology.image();
        image.access.users.get(user).map(|u| u.credential.clone())
    }

    /// Proposes a change to the AMQP model and waits until this node's image has it.
    pub(crate) async fn propose(&self, cmd: AmqpCommand, what: &str) -> Result<(), AmqpError> {
        self.topology
            .propose(Command::Amqp(cmd))
            .await
            .map_err(|r| AmqpError::from_refused(&r, what))?;
        // The change is committed; answer once this node acts on it, so the
        // client's next method finds it here.
        if let Some(index) = self.topology.catch_up().await {
            sluice_topology::wait_image(&*self.topology, Duration::from_secs(10), |i| {
                i.applied_index >= index
            })
            .await;
        }
        Ok(())
    }

    /// Deletes a queue: its actor stops (consumers are told), then the metadata.
    pub(crate) async fn delete_queue(&self, vhost: &str, name: &str) {
        let image = self.topology.image();
        if let Some(q) = image.vhost(vhost).and_then(|v| v.queues.get(name)) {
            if let Some(link) = self.queues.lock().remove(&q.topic) {
                link.close();
            }
        }
        let cmd = AmqpCommand::DeleteQueue {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        };
        if let Err(e) = self.propose(cmd, name).await {
            if e.reply_code() != 404 {
                warn!(queue = name, vhost, "cannot delete queue: {e}");
            }
        }
    }

    /// At start: exclusive queues of this node's earlier processes and transient
    /// queues declared here go, as RabbitMQ drops them when their node restarts.
    async fn forget_stale_queues(self: Arc<Self>) {
        let me = self.topology.node_id();
        let ready = sluice_topology::wait_image(&*self.topology, Duration::from_secs(30), |i| {
            i.brokers.contains_key(&me)
        })
        .await;
        if !ready {
            return;
        }
        let (node, process) = (format!("{me}:"), self.process_tag());
        let image = self.topology.image();
        for (vhost, v) in &image.amqp.vhosts {
            for (name, q) in &v.queues {
                let transient = !q.durable || q.exclusive_owner.is_some();
                let earlier_process = q.declared_by.starts_with(&node) && q.declared_by != process;
                if transient && earlier_process {
                    info!(queue = %name, vhost = %vhost, "deleting a queue that did not outlive its node's restart");
                    self.delete_queue(vhost, name).await;
                }
            }
        }
    }
}

/// Decodes `data` as the bytes a client sent, frames up to `frame_max`, and returns
/// how many whole frames came before the end or the first error. The fuzz target's
/// entry: whatever the bytes, this returns.
#[doc(hidden)]
pub fn decode_client_bytes(data: &[u8], frame_max: u32) -> usize {
    let mut buf = bytes::BytesMut::from(data);
    let mut frames = 0;
    while let Ok(Some(_)) = frame::parse_one(&mut buf, frame_max.max(4096)) {
        frames += 1;
    }
    frames
}

/// The node's own uses of queues (the operator's, dead-lettering) share one peer
/// session per leader under this connection id; connections count from 1.
pub(crate) const NODE_SESSION: u64 = 0;

/// How long a login in a node's first moments waits for the default user.
const ACCESS_WAIT: Duration = Duration::from_secs(5);

/// The endpoint name under which a broker registers its AMQP listener.
pub const AMQP_ENDPOINT: &str = "amqp";

/// A queue's arguments as the quorum stores them, parsed.
fn stored_arguments(
    vhost: &str,
    name: &str,
    q: &sluice_topology::amqp::QueueState,
) -> model::QueueArgs {
    model::queue_arguments(name, vhost, &model::decode_table(&q.arguments)).unwrap_or_else(|e| {
        warn!(
            queue = name,
            vhost, "stored queue arguments do not parse ({e}); serving without them"
        );
        model::QueueArgs::default()
    })
}

/// Decodes `data` as the frames of a peer session, both directions, each bounded
/// by `max` bytes; returns how many whole frames came before the end or the
/// first error. The peer fuzz target's entry: whatever the bytes, this returns.
#[doc(hidden)]
pub fn decode_peer_bytes(data: &[u8], max: u64) -> usize {
    peer::decode_all(data, max)
}

pub(crate) fn no_queue(vhost: &str, name: &str) -> AmqpError {
    AmqpError::not_found(format!("no queue '{name}' in vhost '{vhost}'"))
}

/// A short string from text that may be longer than 255 bytes (cut at a character).
pub(crate) fn short(s: &str) -> ShortString {
    ShortString::try_new(&s[..short_len(s)]).unwrap_or_default()
}

/// [`short`], taking the text's own buffer instead of copying it.
pub(crate) fn short_owned(mut s: String) -> ShortString {
    s.truncate(short_len(&s));
    ShortString::try_new(s).unwrap_or_default()
}

/// How much of `s` fits a short string: at most 255 bytes, cut at a character.
fn short_len(s: &str) -> usize {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_strings_are_cut_at_a_character_within_255_bytes() {
        let long = "é".repeat(200);
        let cut = super::short_owned(long.clone());
        assert_eq!(cut.as_str().len(), 254);
        assert!(long.starts_with(cut.as_str()));
        assert_eq!(super::short(&long), cut);
        assert_eq!(super::short_owned("orders.eu".into()).as_str(), "orders.eu");
    }
}
