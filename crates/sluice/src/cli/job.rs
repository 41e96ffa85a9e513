//! `sluice job list|status|cancel|savepoint`: stream jobs that report to a
//! node (`StreamEnv::report_to`), through its HTTP admin port.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::amqp::{print_list, segment, text};
use super::cluster::{request_json, AdminArgs};

#[derive(Args, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Subcommand, Debug)]
enum JobCommand {
    /// Jobs that reported to the node: id, name, state, parallelism, checkpoints,
    /// records read per second.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One job's last report (JSON).
    Status { id: String },
    /// Stop a running job. Its sinks keep what the last completed
    /// checkpoint committed; a run started again restores from it.
    Cancel { id: String },
    /// Take a savepoint now: a checkpoint written into DIR that a run of
    /// the job (at any parallelism) can start from. Waits until it is
    /// written and prints its directory.
    Savepoint {
        id: String,
        /// Directory the savepoint goes in (created; on the job's machine).
        #[arg(long)]
        dir: String,
        /// Stop the job once the savepoint is written, before any later
        /// checkpoint (Flink's stop-with-savepoint): a run started from it
        /// repeats nothing the stopped one committed.
        #[arg(long)]
        stop: bool,
        /// How long to wait for the job to write it, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

pub async fn run(args: JobArgs) -> Result<()> {
    let http = &args.admin.http;
    match args.command {
        JobCommand::List { json } => {
            let v = request_json(http, "GET", "/api/v1/jobs", None).await?;
            print_list(
                &v,
                json,
                &[
                    "id",
                    "name",
                    "state",
                    "parallelism",
                    "checkpoints",
                    "source records/s",
                    "last report",
                ],
                |j| {
                    vec![
                        text(j, "id"),
                        text(j, "name"),
                        text(j, "state"),
                        text(j, "parallelism"),
                        text(&j["checkpoints"], "completed"),
                        // The first stage reads the sources: the job's intake.
                        format!(
                            "{:.0}",
                            j["metrics"][0]["records_in_per_sec"]
                                .as_f64()
                                .unwrap_or(0.0)
                        ),
                        format!(
                            "{:.0}s ago",
                            j["seconds_since_report"].as_f64().unwrap_or(0.0)
                        ),
                    ]
                },
            )
        }
        JobCommand::Status { id } => {
            let v = request_json(http, "GET", &job_path(&id), None).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        JobCommand::Cancel { id } => {
            request_json(http, "POST", &format!("{}/cancel", job_path(&id)), None).await?;
            println!("cancel requested for job {id}");
            Ok(())
        }
        JobCommand::Savepoint {
            id,
            dir,
            stop,
            timeout_secs,
        } => {
            let timeout = Duration::from_secs(timeout_secs);
            let asked = request_json(
                http,
                "POST",
                &format!("{}/savepoints", job_path(&id)),
                Some(&json!({ "dir": dir, "stop": stop })),
            )
            .await?;
            let request = text(&asked, "request");
            let deadline = Instant::now() + timeout;
            loop {
                let job = request_json(http, "GET", &job_path(&id), None).await?;
                if let Some(done) = savepoint(&job, &request) {
                    match text(done, "state").as_str() {
                        "COMPLETED" => {
                            println!("{}", text(done, "path"));
                            return Ok(());
                        }
                        "FAILED" => bail!("savepoint {request} failed: {}", text(done, "error")),
                        _ => {}
                    }
                }
                let state = text(&job, "state");
                if state != "RUNNING" && savepoint(&job, &request).is_none() {
                    bail!("job {id} is {state}: savepoint {request} was not written");
                }
                if Instant::now() >= deadline {
                    bail!("savepoint {request} of job {id} not written within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn job_path(id: &str) -> String {
    format!("/api/v1/jobs/{}", segment(id))
}

/// The job's entry for savepoint `request`, once it reports one.
fn savepoint<'a>(job: &'a Value, request: &str) -> Option<&'a Value> {
    job["savepoints"]
        .as_array()?
        .iter()
        .find(|s| s["request"] == request)
}
