//! `sluice-cluster`: Sluice's metadata quorum, KRaft-style, on [`openraft`].
//!
//! Every Sluice node is a voter of one Raft group whose replicated state machine is the
//! [`MetadataImage`]: the cluster id, the registered brokers and their liveness, topics,
//! partition assignments, leaders, leader epochs, ISRs, topic configs and the next
//! producer id block. The Raft leader is the *controller*. Consensus (elections, log
//! replication, commitment, snapshots) is openraft's; this crate supplies the state
//! machine, durable storage, the TCP transport and the controller duties.
//!
//! # Pieces
//!
//! - [`image`]: `MetadataImage`, [`Command`], `apply`. Pure and deterministic.
//! - [`store`]: openraft's `RaftLogStorage` (log, vote, committed id) and
//!   `RaftStateMachine` (the image and its JSON snapshot) in `data_dir/raft/`.
//! - [`network`]: length-prefixed JSON frames over TCP, a pooled client, openraft's
//!   `RaftNetwork`, and the extra RPCs (forwarded proposals, broker heartbeats,
//!   bootstrap probes).
//! - [`node`]: [`ClusterNode`], the API the broker uses: `start`, `image`, `propose`,
//!   `controller_id`, `shutdown`.
//!
//! # Invariants (names from the Raft paper)
//!
//! - *Election Safety* and *Leader Append-Only* are openraft's. We add: the vote is
//!   fsync'd before `save_vote` returns, so a node never votes twice in a term across a
//!   crash.
//! - *Log Matching*: an entry is appended to the log file and fdatasync'd before the
//!   append callback reports it persisted, so a follower only acknowledges durable
//!   entries and a leader only counts durable copies toward a commit. On open the log is
//!   read up to the first record whose length, CRC32C, JSON or index does not check and
//!   is cut there (a torn tail after kill -9 held no acknowledged entry). `truncate`
//!   (a divergent follower suffix) shortens the file and fsyncs before returning.
//! - *State Machine Safety*: [`MetadataImage::apply`] depends only on the image, the
//!   command and the entry's log index, never on clocks, randomness or local config, so
//!   equal logs give equal images. Commands are validated inside `apply` (never only at
//!   the proposer, whose view may be stale) and a rejection changes nothing.
//! - Snapshots: the image plus its last log id and membership are written atomically
//!   (temp file, fsync, rename, fsync dir) before the log below them is purged; the
//!   purge point is recorded before the log file is rewritten without the purged
//!   entries. The committed log id is persisted, so a restarted node re-applies exactly
//!   the committed suffix above its snapshot.
//!
//! # Partition leadership (KRaft semantics)
//!
//! - No unclean election: a leader is always an ISR member that is live (registered and
//!   unfenced), the first such in replica order (non-draining preferred). Every leader
//!   change bumps `leader_epoch`; every change of a partition record bumps
//!   `partition_epoch`.
//! - Fencing a broker moves leadership off it and removes it from every ISR where
//!   another member remains. When it was the only ISR member, the partition goes
//!   offline (`leader = -1`) with the broker kept as its ISR, and comes back when that
//!   broker is unfenced.
//! - `AlterPartition` (ISR change from the partition leader) is accepted only with the
//!   current leader id, leader epoch and partition epoch; the new ISR is a subset of
//!   the replicas, contains the leader, and only live brokers may join.
//!
//! # Controller duties (only on the Raft leader)
//!
//! Every node heartbeats the controller every `heartbeat_interval` (at a fixed rate: a
//! slow answer does not delay the next one), and remembers the last answered one
//! ([`ClusterNode::last_heartbeat_ack`]). A heartbeat from an
//! unknown broker or a new incarnation (restart) proposes `RegisterBroker`; one from a
//! fenced broker proposes `UnfenceBroker`. A broker silent for longer than
//! `session_timeout` is fenced. Liveness is soft state: a new controller starts with an
//! empty table and counts silence from the start of its own leadership, so every broker
//! gets a full session of grace after a failover.
//!
//! # Bootstrap
//!
//! The voter set is fixed by `peers`. Only the lowest id calls openraft's `initialize`,
//! only if its own Raft state is empty, no reachable peer reports an initialized state,
//! and a majority answers. A node with any Raft state (vote or log) never initializes.
//!
//! # Brokers that join later
//!
//! A node whose id is not among `peers` is a broker only, like a KRaft broker beside a
//! fixed controller quorum: it heartbeats the voters (in turn, until one names the
//! leader), and the controller first adds it to the Raft membership as a *learner*
//! (it receives and applies the metadata log, so it serves Metadata like any node,
//! but never votes, so the quorum size and its fault tolerance do not change), then
//! registers it. From then on topics may be placed on it and partitions reassigned
//! to it. `UnregisterBroker` forgets a stopped broker that holds no replica; the
//! controller then drops it from the membership once it has been silent for a
//! session.
//!
//! # Proposals from any node
//!
//! [`ClusterNode::propose`] writes through the local Raft core when this node leads;
//! otherwise it forwards the command to the leader on a fresh connection. openraft
//! answers `ForwardToLeader` only for an entry it never appended or has truncated, so
//! that answer, like a refused connection, is retried (until `propose_timeout`). An
//! outcome that is unknown (connection lost after sending, no commit in time, e.g. on
//! a leader cut off from its quorum) is answered [`ClusterError::Indeterminate`] and
//! never retried, so the retry logic never applies a command twice; the caller may
//! look at the image to find out.
//!
//! [`ClusterNode::catch_up`] is a Raft read index: the controller confirms its
//! leadership with a quorum and names its commit index, and the caller waits until
//! it has applied that far, so a read of its image afterwards sees every change
//! acknowledged before (the Kafka front end does this before calling a topic
//! unknown). [`ClusterNode::controlled_shutdown`] stops the heartbeats and proposes
//! `FenceBroker` for the node itself, which moves its leadership at once.
//!
//! Every controller-side write (fencing, registration, the cluster id) is bounded in
//! time, so a deposed leader that has not yet heard of the new term (a zombie) cannot
//! wedge its controller loop or the heartbeat handlers.
//!
//! # I/O
//!
//! Log appends, truncations, purges, vote, committed id and snapshot writes run on
//! tokio's blocking pool; readers (replication tasks) only take an in-memory lock, so
//! they never wait for an fsync. Frames on the inter-node port are
//! `[len u32 BE][JSON]`, the length checked against `max_frame` before allocating; a
//! bad frame closes that connection with a log line.
//!
//! # Tests
//!
//! `src/image/tests.rs` checks `apply` against a model over seeded random command
//! sequences (determinism, invariants above, rejections leave the image unchanged).
//! `tests/it`: openraft's storage conformance suite on [`store`]; torn tail and
//! truncation/purge/vote recovery; a kill -9 of a child process mid-proposal; a
//! three-node cluster over TCP (bootstrap, forwarding, controller failover, restart
//! from the data dir, catch-up by InstallSnapshot); broker fencing; malformed frames;
//! and a seeded router test (openraft's network over in-memory filters) that
//! isolates the leader, commits in the majority, heals and checks that the old
//! leader's uncommitted suffix is truncated and all images agree. A failing seed is
//! printed; `SLUICE_SEED=<n>` replays it.

pub mod access;
pub mod amqp;
pub mod image;
pub mod network;
pub mod node;
pub mod quotas;
pub mod store;

use std::io::Cursor;

pub use access::{AccessCommand, AccessModel, Permission, UserState};
pub use amqp::{
    AmqpCommand, AmqpModel, Binding, Destination, ExchangeState, QueueState, Vhost,
    PREDECLARED_EXCHANGES,
};
pub use image::{
    AdoptedTopic, BrokerId, BrokerState, Command, CommandError, CommandOutput, CommandResult,
    ElectionOutcome, InternalTopic, InternalTopicPlan, MetadataImage, PartitionState, TopicState,
    NO_LEADER,
};
pub use node::{
    ClusterConfig, ClusterError, ClusterNode, HeartbeatAck, LocalState, Members, RaftFigures,
    StaleView,
};

/// Raft node id (the broker id as `u64`).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft's type configuration for the metadata quorum.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
