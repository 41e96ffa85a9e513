//! Loopback TCP bandwidth with iperf3 (Debian's package): starts a one-shot
//! server on 127.0.0.1, runs the client with JSON output, reports MB/s.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::stats::{BenchResult, MB};

#[derive(Debug, clap::Args)]
pub struct IperfArgs {
    /// Seconds to transmit.
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// iperf3 binary.
    #[arg(long, default_value = "iperf3")]
    pub iperf3: String,
}

/// Kills the server we started, whatever happens to the client.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: IperfArgs) -> Result<BenchResult> {
    // Let the kernel pick a free port, then hand it to iperf3.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server = Server(
        Command::new(&args.iperf3)
            .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} -s", args.iperf3))?,
    );
    // No connect probe: iperf3 takes any connection for a test's control
    // channel, and a probe that hangs up can leave the server refusing the
    // real client. Retry the client until the server listens instead.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new(&args.iperf3)
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                &args.seconds.to_string(),
                "-J",
            ])
            .output()
            .context("running the iperf3 client")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed = if out.status.success() {
            parse(&text, args.seconds)
        } else {
            Err(anyhow::anyhow!(
                "iperf3 client failed: {}",
                text.chars().take(300).collect::<String>()
            ))
        };
        match parsed {
            Ok(r) => {
                drop(server);
                return Ok(r);
            }
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(e) => eprintln!("iperf3 not ready yet ({e}); retrying"),
        }
    }
}

/// Converts iperf3's JSON report into a result (receiver-side bandwidth).
pub fn parse(text: &str, seconds: u32) -> Result<BenchResult> {
    let v: Value = serde_json::from_str(text).context("iperf3 JSON")?;
    let end = v.get("end").context("iperf3 JSON without `end`")?;
    let recv = end
        .get("sum_received")
        .context("iperf3 JSON without end.sum_received")?;
    let bps = recv
        .get("bits_per_second")
        .and_then(Value::as_f64)
        .context("end.sum_received.bits_per_second")?;
    let secs = recv
        .get("seconds")
        .and_then(Value::as_f64)
        .unwrap_or(f64::from(seconds));
    let bytes = recv.get("bytes").and_then(Value::as_u64).unwrap_or(0);
    let cpu = end
        .get("cpu_utilization_percent")
        .and_then(|c| c.get("host_total"))
        .and_then(Value::as_f64);
    let mut r = BenchResult::new(
        "loopback-tcp",
        "iperf3 one stream, 127.0.0.1",
        "tcp",
        0,
        0,
        Duration::from_secs_f64(secs.max(0.0)),
        None,
        0.0,
        false,
    );
    r.mb_per_sec = bps / 8.0 / MB;
    r.durable_before_ack = None;
    let mut r = r.with("gbit_per_sec", bps / 1e9).with("bytes", bytes);
    if let Some(c) = cpu {
        r = r.with("iperf3_client_cpu_percent", c);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_receiver_bandwidth() {
        let text = r#"{"start":{},"end":{"sum_received":{"seconds":2.0,"bytes":4000000000,
            "bits_per_second":16000000000.0},"cpu_utilization_percent":{"host_total":88.5}}}"#;
        let r = parse(text, 2).expect("parse");
        assert!((r.mb_per_sec - 2000.0).abs() < 1e-6);
        assert_eq!(
            r.extra.get("gbit_per_sec").and_then(Value::as_f64),
            Some(16.0)
        );
        assert_eq!(r.durable_before_ack, None);
        assert_eq!(r.system, "loopback-tcp");
    }

    #[test]
    fn rejects_error_report() {
        assert!(parse(r#"{"error":"unable to connect"}"#, 1).is_err());
        assert!(parse("not json", 1).is_err());
    }
}
