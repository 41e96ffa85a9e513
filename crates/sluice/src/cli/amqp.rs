//! `sluice queue`, `sluice exchange` and `sluice binding`: the AMQP objects,
//! through any node's HTTP admin port (like `rabbitmqadmin`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use super::cluster::{request_json, table, AdminArgs};
use super::parse_kv;

/// Which virtual host.
#[derive(Args, Debug, Clone)]
pub struct VhostArg {
    #[arg(long, default_value = "/", global = true)]
    vhost: String,
}

#[derive(Args, Debug)]
pub struct QueueArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    vhost: VhostArg,
    #[command(subcommand)]
    command: QueueCommand,
}

#[derive(Subcommand, Debug)]
enum QueueCommand {
    /// Queues with their ready and unacknowledged messages, consumers and rates
    /// (counted on each queue's leader).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Declare a queue (durable unless --transient).
    Declare {
        name: String,
        #[arg(long)]
        transient: bool,
        #[arg(long)]
        auto_delete: bool,
        /// Queue argument, e.g. --arg x-max-length=1000; repeatable.
        #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
        args: Vec<(String, String)>,
    },
    /// Delete a queue and its messages.
    Delete {
        name: String,
        #[arg(long)]
        if_unused: bool,
        #[arg(long)]
        if_empty: bool,
    },
    /// Remove a queue's ready messages.
    Purge { name: String },
    /// Take messages, then acknowledge them (or --requeue them).
    Get {
        name: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long)]
        requeue: bool,
    },
}

#[derive(Args, Debug)]
pub struct ExchangeArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    vhost: VhostArg,
    #[command(subcommand)]
    command: ExchangeCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

#[derive(Subcommand, Debug)]
enum ExchangeCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Declare an exchange (durable unless --transient).
    Declare {
        name: String,
        #[arg(long = "type", value_enum)]
        kind: ExchangeKind,
        #[arg(long)]
        transient: bool,
        #[arg(long)]
        auto_delete: bool,
        #[arg(long)]
        internal: bool,
        /// Exchange argument, e.g. --arg alternate-exchange=unrouted; repeatable.
        #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
        args: Vec<(String, String)>,
    },
    /// Delete an exchange and its bindings.
    Delete { name: String },
}

#[derive(Args, Debug)]
pub struct BindingArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    vhost: VhostArg,
    #[command(subcommand)]
    command: BindingCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DestinationType {
    Queue,
    Exchange,
}

#[derive(Args, Debug)]
struct BindingSpec {
    /// The exchange messages come from.
    source: String,
    /// The queue (or exchange) they go to.
    destination: String,
    #[arg(long, value_enum, default_value = "queue")]
    destination_type: DestinationType,
    #[arg(long, default_value = "")]
    routing_key: String,
    /// Binding argument (headers exchanges: --arg x-match=any --arg format=pdf).
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
    args: Vec<(String, String)>,
}

#[derive(Subcommand, Debug)]
enum BindingCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    Add(BindingSpec),
    Remove(BindingSpec),
}

/// A path segment, percent-encoded (a virtual host `/` is `%2F`).
pub(crate) fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn arguments(args: &[(String, String)]) -> Value {
    Value::Object(
        args.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<String, Value>>(),
    )
}

pub(crate) fn text(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn rate(v: &Value, key: &str) -> String {
    format!("{:.1}", v[key].as_f64().unwrap_or(0.0))
}

pub(crate) fn print_list(
    value: &Value,
    json_out: bool,
    header: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(value)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = value
        .as_array()
        .context("the node's answer is not a list")?
        .iter()
        .map(row)
        .collect();
    print!("{}", table(header, &rows));
    Ok(())
}

pub async fn run_queue(args: QueueArgs) -> Result<()> {
    let http = &args.admin.http;
    let vhost = segment(&args.vhost.vhost);
    match args.command {
        QueueCommand::List { json } => {
            let v = request_json(http, "GET", "/api/v1/queues", None).await?;
            print_list(
                &v,
                json,
                &[
                    "vhost",
                    "name",
                    "ready",
                    "unacked",
                    "consumers",
                    "publish/s",
                    "deliver/s",
                    "ack/s",
                    "leader",
                ],
                |q| {
                    vec![
                        text(q, "vhost"),
                        text(q, "name"),
                        text(q, "messages_ready"),
                        text(q, "messages_unacknowledged"),
                        text(q, "consumers"),
                        rate(q, "publish_rate"),
                        rate(q, "deliver_rate"),
                        rate(q, "ack_rate"),
                        text(q, "leader"),
                    ]
                },
            )
        }
        QueueCommand::Declare {
            name,
            transient,
            auto_delete,
            args: a,
        } => {
            let body = json!({ "durable": !transient, "auto_delete": auto_delete, "arguments": arguments(&a) });
            let path = format!("/api/v1/queues/{vhost}/{}", segment(&name));
            request_json(http, "PUT", &path, Some(&body)).await?;
            println!("queue {name} declared");
            Ok(())
        }
        QueueCommand::Delete {
            name,
            if_unused,
            if_empty,
        } => {
            let path = format!(
                "/api/v1/queues/{vhost}/{}?if_unused={if_unused}&if_empty={if_empty}",
                segment(&name)
            );
            let v = request_json(http, "DELETE", &path, None).await?;
            println!(
                "queue {name} deleted ({} ready messages)",
                text(&v, "message_count")
            );
            Ok(())
        }
        QueueCommand::Purge { name } => {
            let path = format!("/api/v1/queues/{vhost}/{}/contents", segment(&name));
            let v = request_json(http, "DELETE", &path, None).await?;
            println!(
                "queue {name} purged ({} messages)",
                text(&v, "message_count")
            );
            Ok(())
        }
        QueueCommand::Get {
            name,
            count,
            requeue,
        } => {
            let path = format!("/api/v1/queues/{vhost}/{}/get", segment(&name));
            let body = json!({ "count": count, "requeue": requeue });
            let v = request_json(http, "POST", &path, Some(&body)).await?;
            print_list(
                &v,
                false,
                &[
                    "routing_key",
                    "exchange",
                    "redelivered",
                    "payload",
                    "bytes",
                    "left",
                ],
                |m| {
                    vec![
                        text(m, "routing_key"),
                        text(m, "exchange"),
                        text(m, "redelivered"),
                        text(m, "payload"),
                        text(m, "payload_bytes"),
                        text(m, "message_count"),
                    ]
                },
            )
        }
    }
}

pub async fn run_exchange(args: ExchangeArgs) -> Result<()> {
    let http = &args.admin.http;
    let vhost = segment(&args.vhost.vhost);
    match args.command {
        ExchangeCommand::List { json } => {
            let v = request_json(http, "GET", "/api/v1/exchanges", None).await?;
            print_list(
                &v,
                json,
                &[
                    "vhost",
                    "name",
                    "type",
                    "durable",
                    "auto_delete",
                    "internal",
                ],
                |e| {
                    vec![
                        text(e, "vhost"),
                        text(e, "name"),
                        text(e, "type"),
                        text(e, "durable"),
                        text(e, "auto_delete"),
                        text(e, "internal"),
                    ]
                },
            )
        }
        ExchangeCommand::Declare {
            name,
            kind,
            transient,
            auto_delete,
            internal,
            args: a,
        } => {
            let kind = format!("{kind:?}").to_lowercase();
            let body = json!({
                "type": kind,
                "durable": !transient,
                "auto_delete": auto_delete,
                "internal": internal,
                "arguments": arguments(&a),
            });
            let path = format!("/api/v1/exchanges/{vhost}/{}", segment(&name));
            request_json(http, "PUT", &path, Some(&body)).await?;
            println!("exchange {name} declared");
            Ok(())
        }
        ExchangeCommand::Delete { name } => {
            let path = format!("/api/v1/exchanges/{vhost}/{}", segment(&name));
            request_json(http, "DELETE", &path, None).await?;
            println!("exchange {name} deleted");
            Ok(())
        }
    }
}

pub async fn run_binding(args: BindingArgs) -> Result<()> {
    let http = &args.admin.http;
    let body = |b: &BindingSpec| {
        json!({
            "vhost": args.vhost.vhost,
            "source": b.source,
            "destination": b.destination,
            "destination_type": format!("{:?}", b.destination_type).to_lowercase(),
            "routing_key": b.routing_key,
            "arguments": arguments(&b.args),
        })
    };
    match &args.command {
        BindingCommand::List { json } => {
            let v = request_json(http, "GET", "/api/v1/bindings", None).await?;
            print_list(
                &v,
                *json,
                &["vhost", "source", "destination", "type", "routing_key"],
                |b| {
                    vec![
                        text(b, "vhost"),
                        text(b, "source"),
                        text(b, "destination"),
                        text(b, "destination_type"),
                        text(b, "routing_key"),
                    ]
                },
            )
        }
        BindingCommand::Add(b) => {
            request_json(http, "POST", "/api/v1/bindings", Some(&body(b))).await?;
            println!(
                "bound {} -> {} ({:?})",
                b.source, b.destination, b.routing_key
            );
            Ok(())
        }
        BindingCommand::Remove(b) => {
            request_json(http, "POST", "/api/v1/bindings/delete", Some(&body(b))).await?;
            println!(
                "unbound {} -> {} ({:?})",
                b.source, b.destination, b.routing_key
            );
            Ok(())
        }
    }
}
