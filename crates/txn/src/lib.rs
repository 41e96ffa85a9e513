//! Kafka transactions (KIP-98, KIP-360): the transaction coordinator's state
//! machine and the records it keeps in `__transaction_state`.
//!
//! This is the coordinator's core, without I/O: [`TxnTable`] holds every
//! transactional id's [`TxnMetadata`] and decides, request by request, what
//! to write (a transition, committed to the log before it takes effect) or
//! which error to answer, as Kafka's coordinator does; [`record`] encodes a
//! transition as the record that is written and replayed. The log side of a
//! transaction (open transactions, markers, the last stable offset) lives in
//! `sluice-log`.
//!
//! Kafka's rules kept here:
//! - a transactional id moves only along Kafka's transitions
//!   ([`TxnState`]); while one is being written every other request for the
//!   id is CONCURRENT_TRANSACTIONS;
//! - InitProducerId bumps the epoch (a fresh producer id once the epoch is
//!   exhausted), fencing earlier instances: their requests are
//!   PRODUCER_FENCED; with an open transaction it first aborts it under the
//!   bumped epoch; a retry whose answer was lost gets the current id and
//!   epoch (KIP-360);
//! - EndTxn moves an open transaction to PrepareCommit or PrepareAbort
//!   (markers are written next) and then to CompleteCommit or
//!   CompleteAbort; a retried EndTxn of a completed transaction succeeds, the
//!   opposite outcome is INVALID_TXN_STATE;
//! - a transaction open past its timeout is aborted under a bumped epoch;
//! - a coordinator that takes over completes every transaction it finds
//!   preparing.

mod coordinator;
pub mod record;
mod state;

pub use coordinator::{MarkerWriter, TxnConfig, TxnCoordinator};

pub use state::{
    End, Init, TopicPartition, TxnMetadata, TxnState, TxnTable, NO_PRODUCER_EPOCH, NO_PRODUCER_ID,
};

#[cfg(test)]
mod tests;
