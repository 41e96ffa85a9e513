//! The accept loop: connection limit, per-connection tasks and graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use sluice_group::Coordination;
use sluice_topology::Topology;
use sluice_txn::{TxnConfig, TxnCoordinator};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::{connection, ServerConfig};

/// How long shutdown waits for in-flight requests (long polls, joins) before
/// dropping the connections that still have some.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every connection shares.
pub(crate) struct Ctx {
    pub topology: Arc<dyn Topology>,
    pub groups: Arc<Coordination>,
    pub txns: Arc<TxnCoordinator>,
    pub config: ServerConfig,
    /// In-flight request and response bytes of all connections.
    pub budget: Arc<connection::Budget>,
    /// True while the data directory's disk is below its free-space floor:
    /// produce is refused (retriable) so retention, compaction and the
    /// broker's own records keep the space that is left.
    pub disk_low: watch::Receiver<bool>,
    pub metrics: Arc<crate::KafkaMetrics>,
    /// Consumers' incremental fetch sessions.
    pub fetch_sessions: crate::fetch_sessions::FetchSessions,
    /// What clients with a quota took and were given lately.
    pub quotas: crate::quotas::Quotas,
}

pub(crate) async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    topology: Arc<dyn Topology>,
    groups: Arc<Coordination>,
    disk_low: watch::Receiver<bool>,
    metrics: Arc<crate::KafkaMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let txns = TxnCoordinator::start(
        topology.clone(),
        Arc::new(crate::handlers::txn::Markers::new(
            topology.clone(),
            groups.clone(),
        )),
        TxnConfig {
            max_timeout_ms: config.transaction_max_timeout_ms,
            ..TxnConfig::default()
        },
    );
    let fetch_sessions = crate::fetch_sessions::FetchSessions::new(
        config.fetch_session_slots,
        crate::fetch_sessions::MAX_CACHED_PARTITIONS,
        metrics.fetch_session_figures(),
    );
    let ctx = Arc::new(Ctx {
        topology,
        groups,
        txns,
        budget: Arc::new(connection::Budget::new(config.max_in_flight_bytes)),
        config,
        disk_low,
        metrics,
        fetch_sessions,
        quotas: crate::quotas::Quotas::new(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(ctx.config.max_connections));
    let per_ip = Arc::new(PerAddress::default());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let Some(address_slot) =
                            per_ip.acquire(peer.ip(), ctx.config.max_connections_per_ip)
                        else {
                            tracing::warn!(%peer,
                                max_connections_per_ip = ctx.config.max_connections_per_ip,
                                "connection limit of this address reached; closing new connection");
                            drop(socket);
                            continue;
                        };
                        let ctx = ctx.clone();
                        let stop = stop_rx.clone();
                        connections.spawn(async move {
                            connection::run(ctx, socket, peer, stop).await;
                            drop(address_slot);
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(%peer, max_connections = ctx.config.max_connections,
                            "connection limit reached; closing new connection");
                        drop(socket);
                    }
                },
                Err(err) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(err) = done {
                    tracing::error!(error = %err, "connection task failed");
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "shutdown grace period over; dropping connections with requests in flight"
        );
        connections.shutdown().await;
    }
    ctx.txns.shutdown();
    Ok(())
}

/// Connections open per client address (Kafka's max.connections.per.ip).
#[derive(Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// A slot for one more connection from `ip`, unless it has `limit` already.
    fn acquire(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

/// One open connection of an address; released on drop.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A wildcard bind address cannot be connected to; tell clients loopback.
pub(crate) fn advertised_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}
