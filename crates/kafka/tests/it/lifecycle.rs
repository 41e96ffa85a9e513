//! Shutdown and the periodic retention task.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kafka_protocol::messages::*;

use crate::harness::*;

#[tokio::test]
async fn shutdown_answers_in_flight_requests_then_returns() {
    let mut server = Server::start().await;
    server.create_topic("sd", 1).await;
    let mut c = server.client().await;
    // A long poll that will wait its full 700 ms.
    let mut req = fetch_request("sd", 0, 0);
    req.min_bytes = 1;
    req.max_wait_ms = 700;
    let sent = c.send(&req, 11).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    server.signal_stop();
    // New connections are refused soon after.
    let addr = server.addr;
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "listener closed after shutdown");
    // The in-flight fetch is still answered.
    let (got, resp) = c.recv::<FetchRequest>(11).await;
    assert_eq!(got, sent);
    assert_eq!(resp.responses[0].partitions[0].error_code, 0);
    assert!(
        c.closed_by_server().await,
        "connection closed after the last response"
    );
    server.stop().await;
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn retention_task_deletes_expired_segments() {
    let server =
        Server::start_with(|s| s.retention_check_interval = Duration::from_millis(50)).await;
    let mut overrides = BTreeMap::new();
    overrides.insert("segment.ms".to_string(), "100".to_string());
    overrides.insert("retention.ms".to_string(), "200".to_string());
    server.create_topic_with("ret", 1, overrides).await;
    let mut c = server.client().await;
    // Records stamped in 1970: expired as soon as their segment is closed.
    for i in 0..3 {
        assert_eq!(
            produce(&mut c, "ret", 0, batch(&[&format!("old{i}")], 1_000))
                .await
                .0,
            0
        );
    }
    let log = server.store.partition("ret", 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while log.log_start_offset() < 3 {
        assert!(
            Instant::now() < deadline,
            "retention never ran: log start {}",
            log.log_start_offset()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The partition keeps working.
    let (code, offset) = produce(&mut c, "ret", 0, batch(&["new"], 1_000)).await;
    assert_eq!((code, offset), (0, 3));
    server.stop().await;
}
