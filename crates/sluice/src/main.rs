//! The `sluice` binary: `sluice serve` runs the broker; `topic`, `produce`,
//! `consume`, `group` and `transaction` are Kafka clients (librdkafka via
//! rdkafka, and sluice-client for the transaction admin APIs librdkafka
//! lacks) that work against Sluice or any Kafka cluster; `queue`, `exchange` and `binding`
//! manage AMQP objects through the HTTP admin port; `bench` is the load generator
//! (sluice-bench, its own lean Kafka client).

mod cli;
mod config;
mod console;
mod http;
mod http_access;
mod http_amqp;
mod http_jobs;
mod http_metrics;
mod logging;
mod resources;
mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: a Kafka-compatible message broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker.
    Serve(Box<config::ServeArgs>),
    /// Create, list, describe, alter and delete topics.
    Topic(cli::topic::TopicArgs),
    /// Produce one record per input line (stdin or --file).
    Produce(cli::produce::ProduceArgs),
    /// Print records of a topic.
    Consume(cli::consume::ConsumeArgs),
    /// List, describe and reset the offsets of consumer groups.
    Group(cli::group::GroupArgs),
    /// List and describe transactions (their coordinators' view).
    Transaction(cli::transaction::TransactionArgs),
    /// Load generator: produce, consume or end-to-end throughput and latency.
    Bench(cli::bench::BenchArgs),
    /// Cluster status through a node's HTTP admin port.
    Cluster(cli::cluster::ClusterArgs),
    /// Move a partition's replicas through a node's HTTP admin port.
    Partition(cli::cluster::PartitionArgs),
    /// Drain a node before maintenance (or undo it), or remove a stopped one.
    Node(cli::cluster::NodeArgs),
    /// AMQP queues: list (depth, consumers, rates), declare, purge, delete, get.
    Queue(cli::amqp::QueueArgs),
    /// AMQP exchanges: list, declare, delete.
    Exchange(cli::amqp::ExchangeArgs),
    /// AMQP bindings: list, add, remove.
    Binding(cli::amqp::BindingArgs),
    /// Users: list, create, passwd, delete.
    User(cli::access::UserArgs),
    /// AMQP virtual hosts: list, create, delete.
    Vhost(cli::access::VhostArgs),
    /// Which virtual hosts a user may use: set, clear.
    Permission(cli::access::PermissionArgs),
    /// Stream jobs reporting to a node: list, status, cancel, savepoint.
    Job(cli::job::JobArgs),
}

// The broker allocates and frees small buffers on one worker thread and
// another (frames parsed by a connection's reader, handled by its connection
// task): glibc's allocator spends a tenth of the AMQP hot path on that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // SLUICE_ADVERTISED_KAFKA is accepted for SLUICE_ADVERTISED_KAFKA_ADDR (the
    // flag has both spellings too). Set before any other thread exists.
    if std::env::var_os("SLUICE_ADVERTISED_KAFKA_ADDR").is_none() {
        if let Some(v) = std::env::var_os("SLUICE_ADVERTISED_KAFKA") {
            std::env::set_var("SLUICE_ADVERTISED_KAFKA_ADDR", v);
        }
    }
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(*args)),
        Command::Topic(args) => runtime.block_on(cli::topic::run(args)),
        Command::Produce(args) => cli::produce::run(&runtime, args),
        Command::Consume(args) => cli::consume::run(&runtime, args),
        Command::Group(args) => runtime.block_on(cli::group::run(args)),
        Command::Transaction(args) => runtime.block_on(cli::transaction::run(args)),
        Command::Bench(args) => runtime.block_on(cli::bench::run(args)),
        Command::Cluster(args) => runtime.block_on(cli::cluster::run_cluster(args)),
        Command::Partition(args) => runtime.block_on(cli::cluster::run_partition(args)),
        Command::Node(args) => runtime.block_on(cli::cluster::run_node(args)),
        Command::Queue(args) => runtime.block_on(cli::amqp::run_queue(args)),
        Command::Exchange(args) => runtime.block_on(cli::amqp::run_exchange(args)),
        Command::Binding(args) => runtime.block_on(cli::amqp::run_binding(args)),
        Command::User(args) => runtime.block_on(cli::access::run_user(args)),
        Command::Vhost(args) => runtime.block_on(cli::access::run_vhost(args)),
        Command::Permission(args) => runtime.block_on(cli::access::run_permission(args)),
        Command::Job(args) => runtime.block_on(cli::job::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout carries the listening line and command output),
/// filtered by SLUICE_LOG (tracing's EnvFilter syntax, default `info`).
fn init_logging() {
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logging::EscapingStderr { ansi })
        .with_ansi(ansi)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_parse() {
        let cli = Cli::try_parse_from([
            "sluice",
            "serve",
            "--data-dir",
            "/d",
            "--kafka-addr",
            "127.0.0.1:0",
            "--flush",
            "interval",
            "--flush-interval-ms",
            "5",
            "--auto-create-topics",
            "false",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve: {:?}", cli.command);
        };
        assert_eq!(args.data_dir.as_deref(), Some(std::path::Path::new("/d")));
        assert_eq!(args.flush, Some(config::FlushMode::Interval));
        assert_eq!(args.flush_interval_ms, Some(5));
        assert_eq!(args.auto_create_topics, Some(false));
        assert!(Cli::try_parse_from(["sluice", "serve", "--flush", "sometimes"]).is_err());
    }

    #[test]
    fn client_flags_parse() {
        assert!(Cli::try_parse_from([
            "sluice",
            "topic",
            "create",
            "t",
            "--partitions",
            "3",
            "--config",
            "retention.ms=1",
            "--bootstrap",
            "h:1"
        ])
        .is_ok());
        assert!(Cli::try_parse_from([
            "sluice",
            "produce",
            "t",
            "--acks",
            "1",
            "--compression",
            "zstd",
            "--header",
            "a=b",
            "--key-separator",
            ":"
        ])
        .is_ok());
        assert!(Cli::try_parse_from(["sluice", "produce", "t", "--acks", "2"]).is_err());
        assert!(Cli::try_parse_from([
            "sluice",
            "bench",
            "e2e",
            "--rate",
            "1000",
            "--duration",
            "2",
            "--acks",
            "1",
            "--compression",
            "lz4",
            "--json"
        ])
        .is_ok());
        assert!(Cli::try_parse_from([
            "sluice",
            "bench",
            "produce",
            "--records",
            "1",
            "--duration",
            "1"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "sluice",
            "consume",
            "t",
            "--from-beginning",
            "--offset",
            "3"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "sluice",
            "consume",
            "t",
            "--group",
            "g",
            "--partition",
            "0"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["sluice", "group", "reset-offsets", "g", "--topic", "t"]).is_err(),
            "a reset target is required"
        );
        assert!(Cli::try_parse_from([
            "sluice",
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
            "--to-latest"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "sluice",
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-offset",
            "5",
            "--execute"
        ])
        .is_ok());
    }

    #[test]
    fn cluster_flags_parse() {
        assert!(Cli::try_parse_from(["sluice", "cluster", "status", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["sluice", "cluster", "status", "--http", "h:8080"]).is_ok());
        assert!(Cli::try_parse_from([
            "sluice",
            "partition",
            "reassign",
            "t",
            "0",
            "--replicas",
            "1,2,3"
        ])
        .is_ok());
        assert!(
            Cli::try_parse_from(["sluice", "partition", "reassign", "t", "0"]).is_err(),
            "--replicas is required"
        );
        assert!(Cli::try_parse_from([
            "sluice",
            "partition",
            "reassign",
            "t",
            "0",
            "--replicas",
            "1,x"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["sluice", "node", "drain", "2", "--undo"]).is_ok());
        assert!(Cli::try_parse_from(["sluice", "node", "drain"]).is_err());
        let cli = Cli::try_parse_from([
            "sluice",
            "serve",
            "--node-id",
            "2",
            "--cluster-peers",
            "1@a:9093,2@b:9093,3@c:9093",
            "--raft-listen",
            "0.0.0.0:9093",
            "--advertised-kafka",
            "127.0.0.1:19093",
            "--replica-addr",
            "b:9092",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve: {:?}", cli.command);
        };
        assert_eq!(args.node_id, Some(2));
        assert_eq!(args.replica_addr.as_deref(), Some("b:9092"));
        assert_eq!(
            args.advertised_kafka_addr.as_deref(),
            Some("127.0.0.1:19093")
        );
    }
}
