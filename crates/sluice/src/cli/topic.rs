//! `sluice topic create|list|describe|alter|delete` through Kafka's admin API
//! (and DescribeProducers for the producers `describe` shows).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;

use super::{all_metadata, parse_kv, transaction, ClientArgs, Wire, REQUEST_TIMEOUT};

#[derive(Args, Debug)]
pub struct TopicArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: TopicCommand,
}

#[derive(Subcommand, Debug)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Copies of each partition; -1 takes the broker's default (1 on a
        /// single node, min(3, live nodes) in a cluster).
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        replication_factor: i32,
        /// Topic config override (e.g. retention.ms=60000); repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_kv)]
        configs: Vec<(String, String)>,
    },
    /// List topic names.
    List {
        /// Also list internal topics (names starting with "__").
        #[arg(long)]
        include_internal: bool,
    },
    /// Show partitions, leaders, replicas, offsets, active producers and
    /// configs of a topic.
    Describe { name: String },
    /// Delete a topic and its data.
    Delete { name: String },
    /// Add partitions and change config overrides of a topic.
    Alter {
        name: String,
        /// New total number of partitions (can only grow).
        #[arg(long)]
        partitions: Option<usize>,
        /// Set a config override; repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_kv)]
        configs: Vec<(String, String)>,
        /// Remove a config override (back to the broker default); repeatable.
        #[arg(long = "delete-config", value_name = "KEY")]
        delete_configs: Vec<String>,
    },
}

fn admin(client: &ClientArgs) -> Result<AdminClient<DefaultClientContext>> {
    client.config().create().with_context(|| {
        format!(
            "cannot create a Kafka admin client for {}",
            client.bootstrap
        )
    })
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(super::REQUEST_TIMEOUT))
}

pub async fn run(args: TopicArgs) -> Result<()> {
    let client = &args.client;
    match args.command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
        } => {
            let mut topic = NewTopic::new(
                &name,
                partitions,
                TopicReplication::Fixed(replication_factor),
            );
            for (k, v) in &configs {
                topic = topic.set(k, v);
            }
            let results = admin(client)?
                .create_topics([&topic], &options())
                .await
                .context("CreateTopics failed")?;
            for r in results {
                if let Err((topic, code)) = r {
                    bail!("cannot create topic {topic:?}: {code}");
                }
            }
            println!("created topic {name} with {partitions} partition(s)");
        }
        TopicCommand::List { include_internal } => {
            let consumer = client.lookup_consumer(None)?;
            let metadata = all_metadata(&consumer)?;
            let mut names: Vec<&str> = metadata
                .topics()
                .iter()
                .map(|t| t.name())
                .filter(|n| include_internal || !n.starts_with("__"))
                .collect();
            names.sort_unstable();
            for name in names {
                println!("{name}");
            }
        }
        TopicCommand::Describe { name } => describe(client, &name).await?,
        TopicCommand::Delete { name } => {
            let results = admin(client)?
                .delete_topics(&[&name], &options())
                .await
                .context("DeleteTopics failed")?;
            for r in results {
                if let Err((topic, code)) = r {
                    bail!("cannot delete topic {topic:?}: {code}");
                }
            }
            println!("deleted topic {name}");
        }
        TopicCommand::Alter {
            name,
            partitions,
            configs,
            delete_configs,
        } => {
            if partitions.is_none() && configs.is_empty() && delete_configs.is_empty() {
                bail!("nothing to alter: give --partitions, --config or --delete-config");
            }
            let admin = admin(client)?;
            if let Some(total) = partitions {
                let results = admin
                    .create_partitions([&NewPartitions::new(&name, total)], &options())
                    .await
                    .context("CreatePartitions failed")?;
                for r in results {
                    if let Err((topic, code)) = r {
                        bail!("cannot grow topic {topic:?} to {total} partitions: {code}");
                    }
                }
                println!("topic {name} now has {total} partition(s)");
            }
            if !configs.is_empty() || !delete_configs.is_empty() {
                alter_configs(&admin, &name, &configs, &delete_configs).await?;
            }
        }
    }
    Ok(())
}

/// Topic-level overrides currently set on `name`.
async fn current_overrides(
    admin: &AdminClient<DefaultClientContext>,
    name: &str,
) -> Result<BTreeMap<String, String>> {
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(name)], &options())
        .await
        .context("DescribeConfigs failed")?;
    let mut overrides = BTreeMap::new();
    for r in results {
        let resource =
            r.map_err(|code| anyhow::anyhow!("cannot describe configs of {name:?}: {code}"))?;
        for entry in resource.entries {
            let is_override = match entry.source {
                ConfigSource::DynamicTopic => true,
                // Brokers before 1.1 do not report sources.
                ConfigSource::Unknown => !entry.is_default,
                _ => false,
            };
            if let (true, Some(value)) = (is_override, entry.value) {
                overrides.insert(entry.name, value);
            }
        }
    }
    Ok(overrides)
}

/// AlterConfigs replaces a topic's whole override set, so the current
/// overrides are read first and the requested changes merged into them.
async fn alter_configs(
    admin: &AdminClient<DefaultClientContext>,
    name: &str,
    set: &[(String, String)],
    delete: &[String],
) -> Result<()> {
    let mut overrides = current_overrides(admin, name).await?;
    for key in delete {
        if overrides.remove(key).is_none() {
            eprintln!("note: {key} was not overridden on {name}");
        }
    }
    for (k, v) in set {
        overrides.insert(k.clone(), v.clone());
    }
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(name));
    for (k, v) in &overrides {
        alter = alter.set(k, v);
    }
    let results = admin
        .alter_configs([&alter], &options())
        .await
        .context("AlterConfigs failed")?;
    for r in results {
        if let Err((_, code)) = r {
            bail!("cannot alter configs of {name:?}: {code}");
        }
    }
    println!("updated configs of {name}");
    Ok(())
}

async fn describe(client: &ClientArgs, name: &str) -> Result<()> {
    let consumer = client.lookup_consumer(None)?;
    let metadata = all_metadata(&consumer)?;
    let Some(topic) = metadata.topics().iter().find(|t| t.name() == name) else {
        bail!("topic {name:?} does not exist");
    };
    if let Some(err) = topic.error() {
        bail!("topic {name:?}: {err:?}");
    }
    let mut partitions: Vec<_> = topic.partitions().iter().collect();
    partitions.sort_by_key(|p| p.id());
    let replication = partitions.first().map_or(0, |p| p.replicas().len());
    println!(
        "Topic: {name}\tPartitions: {}\tReplicationFactor: {replication}",
        partitions.len()
    );
    println!(
        "{:>9}  {:>6}  {:<10}  {:<10}  {:>12}  {:>12}",
        "PARTITION", "LEADER", "REPLICAS", "ISR", "EARLIEST", "LATEST"
    );
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(name, p.id(), REQUEST_TIMEOUT)
            .with_context(|| format!("cannot fetch offsets of {name}/{}", p.id()))?;
        println!(
            "{:>9}  {:>6}  {:<10}  {:<10}  {:>12}  {:>12}",
            p.id(),
            p.leader(),
            join(p.replicas()),
            join(p.isr()),
            low,
            high
        );
    }

    let brokers: BTreeMap<i32, String> = metadata
        .brokers()
        .iter()
        .map(|b| (b.id(), format!("{}:{}", b.host(), b.port())))
        .collect();
    let mut leaders: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    let mut producers = BTreeMap::new();
    for p in &partitions {
        match brokers.get(&p.leader()) {
            Some(addr) => leaders.entry(addr.clone()).or_default().push(p.id()),
            None => {
                producers.insert(p.id(), Err("no leader".to_owned()));
            }
        }
    }
    match Wire::new(client) {
        Ok(mut wire) => {
            producers.extend(transaction::producers(&mut wire, name, leaders).await);
            print_producers(&producers);
        }
        Err(e) => println!("Producers: unavailable ({e:#})"),
    }

    let admin = admin(client)?;
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(name)], &options())
        .await
        .context("DescribeConfigs failed")?;
    println!("Configs:");
    for r in results {
        let resource =
            r.map_err(|code| anyhow::anyhow!("cannot describe configs of {name:?}: {code}"))?;
        let mut entries = resource.entries;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for e in entries {
            let origin = if e.is_default { "default" } else { "override" };
            println!(
                "  {}={}\t({origin})",
                e.name,
                e.value.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// The partitions' active producers (idempotent and transactional), one
/// line each; a single line when there are none.
fn print_producers(producers: &BTreeMap<i32, transaction::Producers>) {
    let any = producers
        .values()
        .any(|p| p.as_ref().map_or(true, |list| !list.is_empty()));
    if !any {
        println!("Producers: none");
        return;
    }
    // One reason for every partition (a broker without DescribeProducers):
    // said once.
    let mut reasons = producers.values().map(|p| p.as_ref().err());
    if let Some(Some(why)) = reasons.next() {
        if producers.len() > 1 && reasons.all(|r| r == Some(why)) {
            println!("Producers: unavailable ({why})");
            return;
        }
    }
    println!("Producers:");
    println!(
        "  {:>9}  {:>12}  {:>5}  {:>13}  {:>14}  {:>16}",
        "PARTITION", "PRODUCER-ID", "EPOCH", "LAST-SEQUENCE", "LAST-TIMESTAMP", "TXN-START-OFFSET"
    );
    for (partition, answer) in producers {
        let list = match answer {
            Ok(list) => list,
            Err(why) => {
                println!("  {partition:>9}  cannot describe: {why}");
                continue;
            }
        };
        for s in list {
            let txn_start = match s.current_txn_start_offset {
                o if o >= 0 => o.to_string(),
                _ => "-".to_owned(),
            };
            println!(
                "  {:>9}  {:>12}  {:>5}  {:>13}  {:>14}  {:>16}",
                partition,
                s.producer_id.0,
                s.producer_epoch,
                s.last_sequence,
                s.last_timestamp,
                txn_start
            );
        }
    }
}

fn join(ids: &[i32]) -> String {
    ids.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}
