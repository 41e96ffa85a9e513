//! A producer's identity for idempotent and transactional runs: its producer
//! id and epoch, its per-partition sequence numbers, and for transactions
//! the conversation with the transaction coordinator (FindCoordinator,
//! InitProducerId, AddPartitionsToTxn, EndTxn), as a Kafka client holds it.

use std::time::Duration;

use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::{AddPartitionsToTxnRequest, ApiKey, ProducerId, TransactionalId};
use kafka_protocol::protocol::StrBytes;
use sluice_client::txn::{self, ProducerIdentity, Retry};
use sluice_client::Connection;

use crate::cluster::{self, topic_name, Cluster};
use crate::BenchError;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What the benchmark's transactions ask for as `transaction.timeout.ms`
/// (the Java producer's default).
const TRANSACTION_TIMEOUT_MS: i32 = 60_000;

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
}

impl Identity {
    /// An idempotent producer's identity, from any broker.
    pub(crate) async fn idempotent(cluster: &Cluster) -> Result<Identity, BenchError> {
        let node = cluster.leaders.first().copied().unwrap_or_default();
        let mut conn = cluster::connect(cluster.address(node)?).await?;
        let ProducerIdentity { producer_id, epoch } =
            txn::init_producer_id(&mut conn, None, TRANSACTION_TIMEOUT_MS).await?;
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
        let addr = txn::find_coordinator(&mut any, transactional_id).await?;
        drop(any);
        let mut conn = cluster::connect(&addr).await?;
        let id = TransactionalId(StrBytes::from_string(transactional_id.to_owned()));
        let ProducerIdentity { producer_id, epoch } =
            txn::init_producer_id(&mut conn, Some(transactional_id), TRANSACTION_TIMEOUT_MS)
                .await?;
        let add_version = conn.versions().pick(ApiKey::AddPartitionsToTxn, 0, 3)?;
        Ok(Identity {
            producer_id,
            epoch,
            sequences: vec![0; cluster.leaders.len()],
            transactional: Some(Coordinator {
                conn,
                transactional_id: id,
                add_version,
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
        let producer = ProducerIdentity {
            producer_id: self.producer_id,
            epoch: self.epoch,
        };
        txn::end_txn(&mut c.conn, c.transactional_id.0.as_str(), producer, true).await?;
        Ok(())
    }
}
