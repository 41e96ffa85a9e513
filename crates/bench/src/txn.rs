//! A producer's identity for idempotent and transactional runs: its producer
//! id and epoch, its per-partition sequence numbers, and for transactions
//! the conversation with the transaction coordinator (FindCoordinator,
//! InitProducerId, AddPartitionsToTxn, EndTxn), as a Kafka client holds it.

use std::time::{Duration, Instant};

use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, ApiKey, EndTxnRequest, FindCoordinatorRequest,
    InitProducerIdRequest, ProducerId, TransactionalId,
};
use kafka_protocol::protocol::StrBytes;
use sluice_client::Connection;
use sluice_vocab::ErrorCode;

use crate::cluster::{self, topic_name, Cluster};
use crate::BenchError;

/// How long a coordinator may keep answering with retriable errors (it is
/// being created or loaded, or the previous transaction is still writing its
/// markers) before the run gives up.
const RETRY_FOR: Duration = Duration::from_secs(30);
const RETRY_BACKOFF: Duration = Duration::from_millis(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What the benchmark's transactions ask for as `transaction.timeout.ms`
/// (the Java producer's default).
const TRANSACTION_TIMEOUT_MS: i32 = 60_000;
/// FindCoordinator's key type for transactional ids.
const TRANSACTION_KEY: i8 = 1;

/// What a producer stamps on its batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub producer_id: i64,
    pub epoch: i16,
    /// Sequence of the batch's first record; -1 when not idempotent.
    pub base_sequence: i32,
    pub transactional: bool,
}

impl Stamp {
    pub const PLAIN: Stamp = Stamp {
        producer_id: -1,
        epoch: -1,
        base_sequence: -1,
        transactional: false,
    };
}

/// A producer's identity and sequences; with a coordinator, its transactions.
pub(crate) struct Identity {
    producer_id: i64,
    epoch: i16,
    /// Next sequence per partition.
    sequences: Vec<i32>,
    transactional: Option<Coordinator>,
}

struct Coordinator {
    conn: Connection,
    transactional_id: TransactionalId,
    add_version: i16,
    end_version: i16,
}

impl Identity {
    /// An idempotent producer's identity, from any broker.
    pub(crate) async fn idempotent(cluster: &Cluster) -> Result<Identity, BenchError> {
        let node = cluster.leaders.first().copied().unwrap_or_default();
        let mut conn = cluster::connect(cluster.address(node)?).await?;
        let (producer_id, epoch) = init_producer_id(&mut conn, None).await?;
        Ok(Identity {
            producer_id,
            epoch,
            sequences: vec![0; cluster.leaders.len()],
            transactional: None,
        })
    }

    /// A transactional producer's identity, from the coordinator of
    /// `transactional_id`; every earlier producer with that id is fenced.
    pub(crate) async fn transactional(
        cluster: &Cluster,
        transactional_id: &str,
    ) -> Result<Identity, BenchError> {
        let node = cluster.leaders.first().copied().unwrap_or_default();
        let mut any = cluster::connect(cluster.address(node)?).await?;
        let addr = find_coordinator(&mut any, transactional_id).await?;
        drop(any);
        let mut conn = cluster::connect(&addr).await?;
        let id = TransactionalId(StrBytes::from_string(transactional_id.to_owned()));
        let (producer_id, epoch) = init_producer_id(&mut conn, Some(id.clone())).await?;
        let add_version = conn.versions().pick(ApiKey::AddPartitionsToTxn, 0, 3)?;
        let end_version = conn.versions().pick(ApiKey::EndTxn, 0, 3)?;
        Ok(Identity {
            producer_id,
            epoch,
            sequences: vec![0; cluster.leaders.len()],
            transactional: Some(Coordinator {
                conn,
                transactional_id: id,
                add_version,
                end_version,
            }),
        })
    }

    /// The stamp of the next batch of `records` records to `partition`,
    /// advancing its sequence (which wraps at i32::MAX, as Kafka's does).
    pub(crate) fn next(&mut self, partition: usize, records: u32) -> Stamp {
        let Some(seq) = self.sequences.get_mut(partition) else {
            return Stamp::PLAIN;
        };
        let base_sequence = *seq;
        *seq = ((i64::from(base_sequence) + i64::from(records)) % (i64::from(i32::MAX) + 1)) as i32;
        Stamp {
            producer_id: self.producer_id,
            epoch: self.epoch,
            base_sequence,
            transactional: self.transactional.is_some(),
        }
    }

    /// The id a Produce request of a transactional batch names.
    pub(crate) fn transactional_id(&self) -> Option<TransactionalId> {
        self.transactional
            .as_ref()
            .map(|c| c.transactional_id.clone())
    }

    /// Starts a transaction over `partitions` of `topic` (AddPartitionsToTxn).
    pub(crate) async fn begin(&mut self, topic: &str, partitions: u32) -> Result<(), BenchError> {
        let Some(c) = self.transactional.as_mut() else {
            return Ok(());
        };
        let req = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(c.transactional_id.clone())
            .with_v3_and_below_producer_id(ProducerId(self.producer_id))
            .with_v3_and_below_producer_epoch(self.epoch)
            .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
                .with_name(topic_name(topic))
                .with_partitions((0..partitions as i32).collect())]);
        let retry = Retry::new("AddPartitionsToTxn");
        loop {
            let resp = c
                .conn
                .call_within(&req, c.add_version, REQUEST_TIMEOUT)
                .await?;
            let worst = resp
                .results_by_topic_v3_and_below
                .iter()
                .flat_map(|t| &t.results_by_partition)
                .map(|p| p.partition_error_code)
                .find(|code| *code != 0)
                .unwrap_or(resp.error_code);
            if retry.done(worst).await? {
                return Ok(());
            }
        }
    }

    /// Commits the open transaction (EndTxn); every batch of it must have
    /// been acknowledged.
    pub(crate) async fn commit(&mut self) -> Result<(), BenchError> {
        let Some(c) = self.transactional.as_mut() else {
            return Ok(());
        };
        let req = EndTxnRequest::default()
            .with_transactional_id(c.transactional_id.clone())
            .with_producer_id(ProducerId(self.producer_id))
            .with_producer_epoch(self.epoch)
            .with_committed(true);
        let retry = Retry::new("EndTxn");
        loop {
            let resp = c
                .conn
                .call_within(&req, c.end_version, REQUEST_TIMEOUT)
                .await?;
            if retry.done(resp.error_code).await? {
                return Ok(());
            }
        }
    }
}

/// Retries what a Kafka client retries (plus CONCURRENT_TRANSACTIONS, which
/// a producer retries while the previous transaction's markers are being
/// written), for at most [`RETRY_FOR`].
struct Retry {
    what: &'static str,
    deadline: Instant,
}

impl Retry {
    fn new(what: &'static str) -> Retry {
        Retry {
            what,
            deadline: Instant::now() + RETRY_FOR,
        }
    }

    /// Ok(true) when the answer was a success, Ok(false) after a backoff
    /// when the request should be sent again.
    async fn done(&self, answer: i16) -> Result<bool, BenchError> {
        let Err(code) = ErrorCode::check(answer) else {
            return Ok(true);
        };
        let again = code.is_retriable() || code == ErrorCode::ConcurrentTransactions;
        if !again || Instant::now() >= self.deadline {
            return Err(BenchError::Broker {
                what: self.what.to_owned(),
                code,
            });
        }
        tokio::time::sleep(RETRY_BACKOFF).await;
        Ok(false)
    }
}

async fn find_coordinator(
    conn: &mut Connection,
    transactional_id: &str,
) -> Result<String, BenchError> {
    // v1-v3 name one key; v4 batches them.
    let version = conn.versions().pick(ApiKey::FindCoordinator, 1, 3)?;
    let req = FindCoordinatorRequest::default()
        .with_key(StrBytes::from_string(transactional_id.to_owned()))
        .with_key_type(TRANSACTION_KEY);
    let retry = Retry::new("FindCoordinator");
    loop {
        let resp = conn.call_within(&req, version, REQUEST_TIMEOUT).await?;
        if retry.done(resp.error_code).await? {
            return Ok(format!("{}:{}", resp.host.as_str(), resp.port));
        }
    }
}

async fn init_producer_id(
    conn: &mut Connection,
    transactional_id: Option<TransactionalId>,
) -> Result<(i64, i16), BenchError> {
    let version = conn.versions().pick(ApiKey::InitProducerId, 0, 4)?;
    let req = InitProducerIdRequest::default()
        .with_transactional_id(transactional_id)
        .with_transaction_timeout_ms(TRANSACTION_TIMEOUT_MS)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let retry = Retry::new("InitProducerId");
    loop {
        let resp = conn.call_within(&req, version, REQUEST_TIMEOUT).await?;
        if retry.done(resp.error_code).await? {
            return Ok((resp.producer_id.0, resp.producer_epoch));
        }
    }
}
