//! Cluster-mode handlers against a fake replication layer whose quorum is a
//! local [`MetadataImage`] (commands applied in place), on a real store.

use sluice_vocab::KafkaError;
use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::{Buf, Bytes};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use sluice_cluster::{BrokerState, PartitionState, TopicState, NO_LEADER};
use sluice_log::{FlushPolicy, StoreConfig, TopicConfig};
use sluice_vocab::ErrorCode;

use super::*;
use crate::connection::Slot;
use crate::dispatch::{Hdr, Outcome};
use crate::handlers::cluster_meta::{build_metadata, coordinator, Missing, Wanted};
use crate::server::Ctx;
use crate::ServerConfig;

/// Partitions the fake node leads, with the epoch; the error code otherwise.
type Leads = HashMap<(String, i32), Result<(Arc<Partition>, i32), i16>>;

struct Fake {
    image: watch::Sender<Arc<MetadataImage>>,
    proposals: parking_lot::Mutex<Vec<Command>>,
    leads: parking_lot::Mutex<Leads>,
    roles: watch::Sender<u64>,
    stale: parking_lot::Mutex<bool>,
}

impl Fake {
    fn new(image: MetadataImage) -> Arc<Fake> {
        Arc::new(Fake {
            image: watch::channel(Arc::new(image)).0,
            proposals: parking_lot::Mutex::new(Vec::new()),
            leads: parking_lot::Mutex::new(HashMap::new()),
            roles: watch::channel(0).0,
            stale: parking_lot::Mutex::new(false),
        })
    }
}

impl Replicas for Fake {
    fn image(&self) -> Arc<MetadataImage> {
        self.image.borrow().clone()
    }
    fn watch_image(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.image.subscribe()
    }
    fn controller_id(&self) -> Option<i32> {
        Some(1)
    }
    fn metadata_stale(&self) -> bool {
        *self.stale.lock()
    }
    fn catch_up(&self) -> BoxFut<'_, Option<u64>> {
        let index = self.image.borrow().applied_index;
        Box::pin(async move { Some(index) })
    }
    fn propose(&self, cmd: Command) -> BoxFut<'_, Result<CommandResult, ClusterError>> {
        self.proposals.lock().push(cmd.clone());
        let mut image = (**self.image.borrow()).clone();
        let index = image.applied_index + 1;
        let result = image.apply(index, &cmd);
        self.image.send_replace(Arc::new(image));
        Box::pin(async move { Ok(result) })
    }
    fn leader_for_produce(
        &self,
        topic: &str,
        partition: i32,
        _acks_all: bool,
    ) -> Result<ProduceLeader, i16> {
        let found = self
            .leads
            .lock()
            .get(&(topic.to_owned(), partition))
            .cloned();
        match found {
            Some(Ok((p, _))) => Ok(ProduceLeader {
                partition: p,
                token: Arc::new(()),
            }),
            Some(Err(code)) => Err(code),
            None => Err(3),
        }
    }
    fn append(
        &self,
        leader: &ProduceLeader,
        records: &[u8],
    ) -> Result<AppendResult, (i16, String)> {
        leader
            .partition
            .append(records, 5)
            .map_err(|e| (e.error_code().code(), e.to_string()))
    }
    fn wait_replicated<'a>(
        &'a self,
        _leader: &'a ProduceLeader,
        _end_offset: i64,
        _timeout: Duration,
    ) -> BoxFut<'a, Result<(), i16>> {
        Box::pin(async { Err(7) })
    }
    fn leader_for_read(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> Result<(Arc<Partition>, i32), i16> {
        let found = self
            .leads
            .lock()
            .get(&(topic.to_owned(), partition))
            .cloned();
        match found {
            Some(Ok((p, epoch))) if current_leader_epoch < 0 || current_leader_epoch == epoch => {
                Ok((p, epoch))
            }
            Some(Ok((_, epoch))) if current_leader_epoch > epoch => Err(79),
            Some(Ok(_)) => Err(74),
            Some(Err(code)) => Err(code),
            None => Err(3),
        }
    }
    fn on_follower_fetch(
        &self,
        topic: &str,
        partition: i32,
        _replica_id: i32,
        _fetch_offset: i64,
        current_leader_epoch: i32,
        _log_start_offset: i64,
    ) -> Result<Arc<Partition>, i16> {
        self.leader_for_read(topic, partition, current_leader_epoch)
            .map(|(p, _)| p)
    }
    fn low_watermark(&self, topic: &str, partition: i32) -> Result<i64, i16> {
        self.leader_for_read(topic, partition, -1)
            .map(|(p, _)| p.log_start_offset())
    }
    fn watch_roles(&self) -> watch::Receiver<u64> {
        self.roles.subscribe()
    }
    fn leader_epoch_of(&self, topic: &str, partition: i32) -> Option<i32> {
        match self.leads.lock().get(&(topic.to_owned(), partition)) {
            Some(Ok((_, e))) => Some(*e),
            _ => None,
        }
    }
}

fn broker(port: u16, fenced: bool) -> BrokerState {
    BrokerState {
        kafka_host: "h".into(),
        kafka_port: port,
        raft_addr: String::new(),
        replica_addr: String::new(),
        fenced,
        draining: false,
        incarnation: 1,
        epoch: 1,
    }
}

fn partition(replicas: &[i32], isr: &[i32], leader: i32, epoch: i32) -> PartitionState {
    PartitionState {
        replicas: replicas.to_vec(),
        isr: isr.to_vec(),
        leader,
        leader_epoch: epoch,
        partition_epoch: 0,
        target_replicas: None,
    }
}

/// Brokers 1, 2 live and 3 fenced; topic "t": p0 led by 1, p1 offline.
fn image() -> MetadataImage {
    let mut image = MetadataImage {
        cluster_id: "cid".into(),
        ..Default::default()
    };
    image.brokers.insert(1, broker(9001, false));
    image.brokers.insert(2, broker(9002, false));
    image.brokers.insert(3, broker(9003, true));
    image.topics.insert(
        "t".into(),
        TopicState {
            topic_id: [7; 16],
            configs: Default::default(),
            partitions: vec![
                partition(&[1, 2, 3], &[1, 2], 1, 4),
                partition(&[3], &[3], NO_LEADER, 2),
            ],
        },
    );
    image
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

#[test]
fn metadata_from_the_image() {
    let image = image();
    let resp = build_metadata(&image, Some(2), "cid", None, Missing::Unknown);
    let brokers: Vec<(i32, i32)> = resp.brokers.iter().map(|b| (b.node_id.0, b.port)).collect();
    assert_eq!(
        brokers,
        vec![(1, 9001), (2, 9002)],
        "fenced broker 3 is not listed"
    );
    assert_eq!(resp.controller_id.0, 2);
    assert_eq!(resp.topics.len(), 1);
    let t = &resp.topics[0];
    assert_eq!(t.topic_id.as_bytes(), &[7; 16]);
    let p0 = &t.partitions[0];
    assert_eq!((p0.error_code, p0.leader_id.0, p0.leader_epoch), (0, 1, 4));
    assert_eq!(
        p0.replica_nodes.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        p0.isr_nodes.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        p0.offline_replicas.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![3]
    );
    let p1 = &t.partitions[1];
    assert_eq!(p1.error_code, ErrorCode::LeaderNotAvailable.code());
    assert_eq!(p1.leader_id.0, -1);
    for v in 0..=12 {
        let mut buf = bytes::BytesMut::new();
        resp.encode(&mut buf, v).expect("encodes");
    }
}

#[test]
fn metadata_for_named_and_missing_topics() {
    let image = image();
    let wanted = vec![
        Wanted::Name(name("t")),
        Wanted::Name(name("nope")),
        Wanted::Name(name("bad name")),
        Wanted::Id(uuid::Uuid::from_bytes([7; 16])),
        Wanted::Id(uuid::Uuid::from_bytes([9; 16])),
    ];
    let codes = |missing| {
        build_metadata(&image, None, "cid", Some(wanted.clone()), missing)
            .topics
            .iter()
            .map(|t| t.error_code)
            .collect::<Vec<_>>()
    };
    assert_eq!(codes(Missing::Unknown), vec![0, 3, 17, 0, 100]);
    assert_eq!(codes(Missing::Creating), vec![0, 5, 17, 0, 100]);
    let resp = build_metadata(&image, None, "cid", Some(wanted), Missing::Unknown);
    assert_eq!(resp.controller_id.0, -1);
    assert_eq!(
        resp.topics[3].name.as_ref().map(|n| n.0.as_str()),
        Some("t")
    );
}

#[test]
fn coordinator_is_the_offsets_leader() {
    let mut image = image();
    let (code, _, node, ..) = coordinator(&image, 0);
    assert_eq!(
        (code, node),
        (ErrorCode::CoordinatorNotAvailable.code(), -1)
    );
    image.topics.insert(
        OFFSETS_TOPIC.into(),
        TopicState {
            topic_id: [1; 16],
            configs: Default::default(),
            partitions: vec![partition(&[2, 1], &[2, 1], 2, 0)],
        },
    );
    let (code, _, node, host, port) = coordinator(&image, 0);
    assert_eq!((code, node, host.as_str(), port), (0, 2, "h", 9002));
    // A fenced leader is no coordinator.
    image.brokers.insert(2, broker(9002, true));
    assert_eq!(
        coordinator(&image, 0).0,
        ErrorCode::CoordinatorNotAvailable.code()
    );
    assert_eq!(
        coordinator(&image, 1).0,
        ErrorCode::CoordinatorNotAvailable.code()
    );
}

// ---- through the handlers -----------------------------------------------------

struct Env {
    _dir: tempfile::TempDir,
    ctx: Arc<Ctx>,
    fake: Arc<Fake>,
    cluster: Arc<ClusterCtx>,
}

fn env(image: MetadataImage) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreConfig {
        data_dir: dir.path().to_path_buf(),
        defaults: TopicConfig::default(),
        flush: FlushPolicy::Always,
    })
    .expect("store");
    let fake = Fake::new(image);
    let cluster = Arc::new(ClusterCtx::new(fake.clone()));
    let ctx = Arc::new(Ctx {
        store,
        groups: None,
        cluster: Some(cluster.clone()),
        config: ServerConfig::default(),
        host: "localhost".into(),
        port: 9092,
        topic_ids: parking_lot::RwLock::new(HashMap::new()),
    });
    Env {
        _dir: dir,
        ctx,
        fake,
        cluster,
    }
}

fn hdr(api: ApiKey, version: i16) -> Hdr {
    Hdr {
        api,
        version,
        correlation_id: 1,
        peer: SocketAddr::from(([127, 0, 0, 1], 1)),
    }
}

/// The response body of an outcome.
async fn body<R: Decodable + HeaderVersion>(outcome: Outcome, version: i16) -> R {
    let mut bytes: Bytes = match outcome {
        Outcome::Respond(Slot::Ready(b)) => b,
        Outcome::Respond(Slot::Pending(task)) => task.await.expect("task").expect("encoded"),
        _ => panic!("no response"),
    };
    bytes.advance(4 + 4); // size, correlation id
    if R::header_version(version) >= 1 {
        bytes.advance(1); // no tagged fields
    }
    R::decode(&mut bytes, version).expect("decodes")
}

#[tokio::test]
async fn create_topics_with_default_replication_factor() {
    let env = env(image());
    let req = CreateTopicsRequest::default().with_topics(vec![
        CreatableTopic::default()
            .with_name(name("new"))
            .with_num_partitions(3)
            .with_replication_factor(-1),
        CreatableTopic::default()
            .with_name(name("t"))
            .with_num_partitions(1)
            .with_replication_factor(-1),
        CreatableTopic::default()
            .with_name(name("big"))
            .with_num_partitions(1)
            .with_replication_factor(3),
    ]);
    let outcome = crate::handlers::cluster_admin::create_topics(
        &env.ctx,
        &env.cluster,
        req,
        hdr(ApiKey::CreateTopics, 7),
    );
    let resp: CreateTopicsResponse = body(outcome, 7).await;
    let codes: Vec<i16> = resp.topics.iter().map(|t| t.error_code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            ErrorCode::TopicAlreadyExists.code(),
            ErrorCode::InvalidReplicationFactor.code()
        ]
    );
    // Two live brokers: RF -1 is min(3, 2).
    assert_eq!(
        (
            resp.topics[0].num_partitions,
            resp.topics[0].replication_factor
        ),
        (3, 2)
    );
    let image = env.fake.image();
    let created = image.topics.get("new").expect("in the image");
    assert_eq!(created.partitions.len(), 3);
    assert!(created.partitions.iter().all(|p| p.replicas.len() == 2));
    assert_eq!(resp.topics[0].topic_id.as_bytes(), &created.topic_id);
}

#[tokio::test]
async fn a_node_cut_off_from_the_controller_names_no_leaders() {
    let env = env(image());
    let ask = || {
        crate::handlers::cluster_meta::metadata(
            &env.ctx,
            &env.cluster,
            MetadataRequest::default().with_topics(None),
            hdr(ApiKey::Metadata, 8),
        )
    };
    let fresh: MetadataResponse = body(ask(), 8).await;
    assert_eq!(fresh.topics[0].partitions[0].leader_id.0, 1);
    *env.fake.stale.lock() = true;
    let stale: MetadataResponse = body(ask(), 8).await;
    assert_eq!(
        stale.brokers.len(),
        fresh.brokers.len(),
        "brokers still listed"
    );
    for p in &stale.topics[0].partitions {
        assert_eq!(
            (p.error_code, p.leader_id.0),
            (ErrorCode::LeaderNotAvailable.code(), -1)
        );
        assert!(!p.replica_nodes.is_empty(), "replicas still listed");
    }
}

#[tokio::test]
async fn metadata_auto_creates_through_the_quorum() {
    let env = env(image());
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                .with_name(Some(name("auto"))),
        ]))
        .with_allow_auto_topic_creation(true);
    let outcome = crate::handlers::cluster_meta::metadata(
        &env.ctx,
        &env.cluster,
        req,
        hdr(ApiKey::Metadata, 8),
    );
    let resp: MetadataResponse = body(outcome, 8).await;
    assert_eq!(resp.topics[0].error_code, 0);
    assert_eq!(resp.topics[0].partitions.len(), 1);
    assert!(env.fake.image().topics.contains_key("auto"));
}

#[tokio::test]
async fn producer_ids_come_in_blocks() {
    let env = env(image());
    let first = env.cluster.next_producer_id().await.expect("id");
    let second = env.cluster.next_producer_id().await.expect("id");
    assert_eq!(second, first + 1);
    let allocations = env
        .fake
        .proposals
        .lock()
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::AllocateProducerIds {
                    count: PRODUCER_ID_BLOCK
                }
            )
        })
        .count();
    assert_eq!(allocations, 1);
    assert_eq!(env.fake.image().next_producer_id, first + PRODUCER_ID_BLOCK);
}

fn produce_request(acks: i16) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(1000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name("t"))
            .with_partition_data(vec![
                PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(batch())),
                PartitionProduceData::default()
                    .with_index(1)
                    .with_records(Some(batch())),
            ])])
}

fn batch() -> Bytes {
    use kafka_protocol::records::*;
    let record = Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
        producer_id: NO_PRODUCER_ID,
        producer_epoch: NO_PRODUCER_EPOCH,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: NO_SEQUENCE,
        timestamp: 1,
        key: None,
        value: Some(Bytes::from_static(b"v")),
        headers: Default::default(),
    };
    let mut buf = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &[record],
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encode");
    buf.freeze()
}

#[tokio::test]
async fn produce_goes_to_the_leader_only() {
    let env = env(image());
    let none = std::collections::BTreeMap::new();
    env.ctx
        .store
        .create_topic("t", 2, &none, false)
        .expect("topic");
    let p0 = env.ctx.store.partition("t", 0).expect("p0");
    env.fake
        .leads
        .lock()
        .insert(("t".into(), 0), Ok((p0.clone(), 5)));
    env.fake.leads.lock().insert(("t".into(), 1), Err(6));

    // acks=1: the led partition is appended (stamped by the leader) and durable.
    let outcome =
        crate::handlers::produce::handle(&env.ctx, produce_request(1), hdr(ApiKey::Produce, 8));
    let resp: ProduceResponse = body(outcome, 8).await;
    let parts = &resp.responses[0].partition_responses;
    assert_eq!((parts[0].error_code, parts[0].base_offset), (0, 0));
    assert_eq!(parts[1].error_code, ErrorCode::NotLeaderOrFollower.code());
    assert_eq!(p0.end_offset_for_epoch(5), (5, 1));

    // acks=all: the replication wait's error is the partition's answer.
    let outcome =
        crate::handlers::produce::handle(&env.ctx, produce_request(-1), hdr(ApiKey::Produce, 8));
    let resp: ProduceResponse = body(outcome, 8).await;
    let parts = &resp.responses[0].partition_responses;
    assert_eq!(parts[0].error_code, ErrorCode::RequestTimedOut.code());
    assert_eq!(parts[0].base_offset, -1);
}

#[tokio::test]
async fn consumer_fetch_checks_leadership_and_epoch() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    let env = env(image());
    let none = std::collections::BTreeMap::new();
    env.ctx
        .store
        .create_topic("t", 2, &none, false)
        .expect("topic");
    let p0 = env.ctx.store.partition("t", 0).expect("p0");
    env.fake.leads.lock().insert(("t".into(), 0), Ok((p0, 5)));
    env.fake.leads.lock().insert(("t".into(), 1), Err(6));
    let fetch = |epoch: i32| {
        FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(name("t"))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(0)
                        .with_current_leader_epoch(epoch)
                        .with_partition_max_bytes(1 << 20),
                    FetchPartition::default()
                        .with_partition(1)
                        .with_current_leader_epoch(epoch)
                        .with_partition_max_bytes(1 << 20),
                ])])
    };
    let codes = |resp: FetchResponse| {
        resp.responses[0]
            .partitions
            .iter()
            .map(|p| p.error_code)
            .collect::<Vec<_>>()
    };
    let outcome = crate::handlers::fetch::handle(&env.ctx, fetch(5), hdr(ApiKey::Fetch, 11));
    assert_eq!(codes(body(outcome, 11).await), vec![0, 6]);
    let outcome = crate::handlers::fetch::handle(&env.ctx, fetch(4), hdr(ApiKey::Fetch, 11));
    assert_eq!(codes(body(outcome, 11).await), vec![74, 6]);
    let outcome = crate::handlers::fetch::handle(&env.ctx, fetch(6), hdr(ApiKey::Fetch, 11));
    assert_eq!(codes(body(outcome, 11).await), vec![79, 6]);
}

#[tokio::test]
async fn group_requests_follow_the_coordinator_state() {
    let env = env(image());
    assert_eq!(
        env.ctx.groups().err(),
        Some(ErrorCode::NotCoordinator.code())
    );
    *env.cluster.coordinator.write() = CoordinatorState::Loading(3);
    assert_eq!(
        env.ctx.groups().err(),
        Some(ErrorCode::CoordinatorLoadInProgress.code())
    );
}

#[tokio::test]
async fn coordinator_opens_and_closes_with_leadership() {
    let env = env(image());
    let offsets = sluice_vocab::internal::offsets_topic_configs();
    env.ctx
        .store
        .create_topic(OFFSETS_TOPIC, 1, &offsets, false)
        .expect("offsets topic");
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(follow_coordinator(
        env.cluster.clone(),
        env.ctx.store.clone(),
        GroupConfig::default(),
        stop_rx,
    ));
    let p = env
        .ctx
        .store
        .partition(OFFSETS_TOPIC, 0)
        .expect("partition");
    env.fake
        .leads
        .lock()
        .insert((OFFSETS_TOPIC.into(), 0), Ok((p, 2)));
    env.fake.roles.send_modify(|n| *n += 1);
    let ready = async {
        while env.ctx.groups().is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), ready)
        .await
        .expect("coordinator opened");
    let g = env.ctx.groups().expect("ready");
    env.fake.leads.lock().clear();
    env.fake.roles.send_modify(|n| *n += 1);
    let gone = async {
        while env.ctx.groups().is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .expect("coordinator dropped");
    assert!(g.is_closed());
    let _ = stop_tx.send(true);
    task.await.expect("task");
}
