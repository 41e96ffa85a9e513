//! The conversation with a transaction coordinator, as a Kafka client holds
//! it: finding the coordinator of a transactional id, a producer's id and
//! epoch (InitProducerId), a transaction's state (DescribeTransactions), and
//! ending a transaction (EndTxn) — also one another process started, given
//! its producer id and epoch, which is how a two-phase-commit sink commits
//! after a restart.

use std::time::{Duration, Instant};

use kafka_protocol::messages::{
    ApiKey, DescribeTransactionsRequest, EndTxnRequest, FindCoordinatorRequest,
    InitProducerIdRequest, ListTransactionsRequest, ProducerId, TransactionalId,
};
use kafka_protocol::protocol::StrBytes;
use sluice_vocab::ErrorCode;

use crate::{ClientError, Connection};

/// How long a coordinator may keep answering with retriable errors (it is
/// being created or loaded, or the previous transaction is still writing its
/// markers) before the caller gives up.
const RETRY_FOR: Duration = Duration::from_secs(30);
const RETRY_BACKOFF: Duration = Duration::from_millis(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// FindCoordinator's key type for transactional ids.
const TRANSACTION_KEY: i8 = 1;

/// A producer's identity: what its batches and EndTxn carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerIdentity {
    /// The producer id the coordinator gave.
    pub producer_id: i64,
    /// Its epoch: a newer one fences the older.
    pub epoch: i16,
}

/// A transaction as its coordinator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnDescription {
    /// Kafka's state name: `Empty`, `Ongoing`, `PrepareCommit`,
    /// `CompleteCommit`, `PrepareAbort`, `CompleteAbort`, ...
    pub state: String,
    /// The producer that holds the transactional id now.
    pub producer: ProducerIdentity,
}

/// Retries what a Kafka client retries (plus CONCURRENT_TRANSACTIONS, which
/// a producer retries while the previous transaction's markers are being
/// written), for at most [`RETRY_FOR`].
pub struct Retry {
    what: &'static str,
    deadline: Instant,
}

impl Retry {
    /// Retries for the request named `what` (named in the error).
    pub fn new(what: &'static str) -> Retry {
        Retry {
            what,
            deadline: Instant::now() + RETRY_FOR,
        }
    }

    /// Ok(true) when the answer was a success, Ok(false) after a backoff
    /// when the request should be sent again.
    pub async fn done(&self, answer: i16) -> Result<bool, ClientError> {
        let Err(code) = ErrorCode::check(answer) else {
            return Ok(true);
        };
        let again = code.is_retriable() || code == ErrorCode::ConcurrentTransactions;
        if !again || Instant::now() >= self.deadline {
            return Err(ClientError::Broker {
                what: self.what,
                code,
            });
        }
        tokio::time::sleep(RETRY_BACKOFF).await;
        Ok(false)
    }
}

fn txn_id(transactional_id: &str) -> TransactionalId {
    TransactionalId(StrBytes::from_string(transactional_id.to_owned()))
}

/// The `host:port` of the coordinator of `transactional_id`.
pub async fn find_coordinator(
    conn: &mut Connection,
    transactional_id: &str,
) -> Result<String, ClientError> {
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

/// A new producer identity (idempotent without an id); with a
/// transactional id, from its coordinator, fencing every earlier producer
/// of that id and aborting its open transaction.
pub async fn init_producer_id(
    conn: &mut Connection,
    transactional_id: Option<&str>,
    transaction_timeout_ms: i32,
) -> Result<ProducerIdentity, ClientError> {
    let version = conn.versions().pick(ApiKey::InitProducerId, 0, 4)?;
    let req = InitProducerIdRequest::default()
        .with_transactional_id(transactional_id.map(txn_id))
        .with_transaction_timeout_ms(transaction_timeout_ms)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let retry = Retry::new("InitProducerId");
    loop {
        let resp = conn.call_within(&req, version, REQUEST_TIMEOUT).await?;
        if retry.done(resp.error_code).await? {
            return Ok(ProducerIdentity {
                producer_id: resp.producer_id.0,
                epoch: resp.producer_epoch,
            });
        }
    }
}

/// Commits (or aborts) the transaction `producer` has open under
/// `transactional_id`, on its coordinator. A retry of a commit that took
/// effect succeeds.
pub async fn end_txn(
    conn: &mut Connection,
    transactional_id: &str,
    producer: ProducerIdentity,
    commit: bool,
) -> Result<(), ClientError> {
    let version = conn.versions().pick(ApiKey::EndTxn, 0, 3)?;
    let req = EndTxnRequest::default()
        .with_transactional_id(txn_id(transactional_id))
        .with_producer_id(ProducerId(producer.producer_id))
        .with_producer_epoch(producer.epoch)
        .with_committed(commit);
    let retry = Retry::new("EndTxn");
    loop {
        let resp = conn.call_within(&req, version, REQUEST_TIMEOUT).await?;
        if retry.done(resp.error_code).await? {
            return Ok(());
        }
    }
}

/// The state of `transactional_id`'s transaction, on its coordinator.
pub async fn describe_transaction(
    conn: &mut Connection,
    transactional_id: &str,
) -> Result<TxnDescription, ClientError> {
    let version = conn.versions().pick(ApiKey::DescribeTransactions, 0, 0)?;
    let req = DescribeTransactionsRequest::default()
        .with_transactional_ids(vec![txn_id(transactional_id)]);
    let retry = Retry::new("DescribeTransactions");
    loop {
        let resp = conn.call_within(&req, version, REQUEST_TIMEOUT).await?;
        let Some(state) = resp.transaction_states.first() else {
            return Err(ClientError::Broker {
                what: "DescribeTransactions",
                code: ErrorCode::UnknownServerError,
            });
        };
        if retry.done(state.error_code).await? {
            return Ok(TxnDescription {
                state: state.transaction_state.as_str().to_owned(),
                producer: ProducerIdentity {
                    producer_id: state.producer_id.0,
                    epoch: state.producer_epoch,
                },
            });
        }
    }
}

/// The transactional ids of the transactions the broker at the other end
/// of `conn` coordinates whose state is `state` (Kafka's names, such as
/// `Ongoing`). Each broker lists only its own: ask them all.
pub async fn list_transactions(
    conn: &mut Connection,
    state: &str,
) -> Result<Vec<String>, ClientError> {
    let version = conn.versions().pick(ApiKey::ListTransactions, 0, 0)?;
    let req = ListTransactionsRequest::default()
        .with_state_filters(vec![StrBytes::from_string(state.to_owned())]);
    let retry = Retry::new("ListTransactions");
    loop {
        let resp = conn.call_within(&req, version, REQUEST_TIMEOUT).await?;
        if retry.done(resp.error_code).await? {
            return Ok(resp
                .transaction_states
                .iter()
                .map(|t| t.transactional_id.0.as_str().to_owned())
                .collect());
        }
    }
}
