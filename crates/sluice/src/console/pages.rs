//! The console's pages. `maud` escapes every value put into the markup, so
//! names and record bytes from users cannot become markup.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use maud::{html, Markup, DOCTYPE};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use super::kafka::{From, LogOffsets, Record};
use super::{utc, Format};
use crate::cli::group::{GroupReport, GroupSummary};
use crate::http::{ClusterTopicView, ClusterView, TopicPartition};

/// A path segment for a user-chosen name (group ids may hold any character).
pub(super) fn segment(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn layout(title: &str, here: &str, node: Option<i32>, body: Markup) -> Markup {
    let tab = |href: &str, name: &str| {
        html! { a href=(href) class=[(here == name).then_some("here")] { (name) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Sluice" }
                // No favicon request (a 404 would be a console error).
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/console/console.css";
                script src="/console/console.js" defer {}
            }
            body {
                header {
                    span.brand { "Sluice" }
                    nav {
                        (tab("/", "Overview"))
                        (tab("/topics", "Topics"))
                        (tab("/groups", "Groups"))
                        (tab("/cluster", "Cluster"))
                        (tab("/queues", "Queues"))
                    }
                    @if let Some(id) = node {
                        span.node { "node " (id) }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub(super) fn failure(title: &str, why: &str) -> Markup {
    layout(
        title,
        "",
        None,
        html! {
            h1 { (title) }
            div.error { (why) }
        },
    )
}

fn card(label: &str, value: impl maud::Render) -> Markup {
    html! { div.card { div.label { (label) } div.value { (value) } } }
}

fn chart(id: &str, source: &str, field: &str, rate: bool, unit: &str, title: &str) -> Markup {
    html! {
        div.chart {
            div.legend { span { (title) } span.chart-max {} }
            svg.live-chart id=(id) viewBox="0 0 600 120" preserveAspectRatio="none"
                data-source=(source) data-field=(field) data-rate=(rate) data-unit=(unit) {
                polyline points="" {}
                circle r="0" {}
            }
            div.legend { span.muted { "last 2 minutes, every 2 s" } span.chart-now { "…" } }
        }
    }
}

fn ids(ids: &[i32]) -> String {
    ids.iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn tp_list(list: &[TopicPartition]) -> Markup {
    html! {
        @if list.is_empty() {
            p.muted { "none" }
        } @else {
            ul {
                @for tp in list {
                    li { a href={ "/topics/" (tp.topic) } { (tp.topic) } " / " (tp.partition) }
                }
            }
        }
    }
}

pub(super) fn overview(view: &ClusterView, unhealthy: Option<&str>, records: i64) -> Markup {
    let partitions: usize = view
        .topics
        .iter()
        .filter(|t| !t.name.starts_with("__"))
        .map(|t| t.partitions.len())
        .sum();
    let topics = view
        .topics
        .iter()
        .filter(|t| !t.name.starts_with("__"))
        .count();
    let alive = view.nodes.iter().filter(|n| n.state == "alive").count();
    let body = html! {
        h1 { "Overview" }
        div.cards {
            (card("Health", match unhealthy {
                None => html! { span.ok { "healthy" } },
                Some(why) => html! { span.bad title=(why) { "unavailable" } },
            }))
            (card("Nodes alive", format!("{alive} / {}", view.nodes.len())))
            (card("Controller", view.controller_id.map_or_else(|| "none".to_owned(), |c| format!("node {c}"))))
            (card("Topics", topics))
            (card("Partitions", partitions))
            (card("Under-replicated", view.under_replicated.len()))
            (card("Offline", view.offline.len()))
            (card("Records stored", records))
        }
        @if let Some(why) = unhealthy {
            div.notice { "This node is unavailable: " (why) }
        }
        h2 { "Throughput" }
        (chart("throughput", "/console/api/totals", "records", true, "records/s", "Records in, per second (all topics)"))
        h2 { "Nodes" }
        (nodes_table(view))
        p.muted { "Cluster " (view.cluster_id) ", metadata applied up to index " (view.metadata_applied_index) "." }
    };
    layout("Overview", "Overview", Some(view.node_id), body)
}

fn nodes_table(view: &ClusterView) -> Markup {
    html! {
        table {
            tr { th { "Node" } th { "State" } th { "Role" } th { "Kafka" } th { "Raft" } th { "Replication" } th.num { "Epoch" } }
            @for n in &view.nodes {
                tr {
                    td { (n.id)
                        @if Some(n.id) == view.controller_id { " " span.muted { "(controller)" } }
                        @if n.id == view.node_id { " " span.muted { "(this node)" } }
                    }
                    td { @if n.state == "alive" { span.ok { (n.state) } } @else { span.bad { (n.state) } } }
                    td { (n.role) }
                    td { (n.kafka) }
                    td { @if n.raft.is_empty() { span.muted { "-" } } @else { (n.raft) } }
                    td { (n.replica) }
                    td.num { (n.broker_epoch) }
                }
            }
        }
    }
}

pub(super) fn topics(
    node: i32,
    topics: &[ClusterTopicView],
    offsets: &BTreeMap<(String, i32), LogOffsets>,
) -> Markup {
    let body = html! {
        h1 { "Topics" }
        table {
            tr { th { "Topic" } th.num { "Partitions" } th.num { "Replication" } th.num { "Records" } th { "Configs" } }
            @for t in topics.iter().filter(|t| !t.name.starts_with("__")) {
                @let records: i64 = t.partitions.iter()
                    .filter_map(|p| offsets.get(&(t.name.clone(), p.partition)))
                    .map(|o| (o.end - o.start).max(0)).sum();
                tr {
                    td { a href={ "/topics/" (t.name) } { (t.name) } }
                    td.num { (t.partitions.len()) }
                    td.num { (t.replication_factor) }
                    td.num { (records) }
                    td.muted { (t.configs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")) }
                }
            }
        }
    };
    layout("Topics", "Topics", Some(node), body)
}

pub(super) fn topic(
    node: i32,
    t: &ClusterTopicView,
    offsets: &BTreeMap<(String, i32), LogOffsets>,
    sizes: &BTreeMap<i32, u64>,
    read_only: bool,
) -> Markup {
    let body = html! {
        h1 { "Topic " (t.name) }
        table {
            tr { th { "Partition" } th { "Leader" } th { "Replicas" } th { "ISR" } th.num { "Log start" } th.num { "Log end" } th.num { "Size here" } th {} }
            @for p in &t.partitions {
                @let o = offsets.get(&(t.name.clone(), p.partition));
                tr {
                    td { (p.partition) }
                    td { @if p.leader < 0 { span.bad { "offline" } } @else { (p.leader) } }
                    td { (ids(&p.replicas))
                        @if let Some(target) = &p.target_replicas { " " span.muted { "→ " (ids(target)) } }
                    }
                    td { (ids(&p.isr))
                        @if p.isr.len() < p.replicas.len() { " " span.bad { "under-replicated" } }
                    }
                    td.num { (o.map_or("-".to_owned(), |o| o.start.to_string())) }
                    td.num { (o.map_or("-".to_owned(), |o| o.end.to_string())) }
                    td.num { (sizes.get(&p.partition).map_or("-".to_owned(), |s| s.to_string())) }
                    td { a href={ "/topics/" (t.name) "/partitions/" (p.partition) } { "browse" } }
                }
            }
        }
        h2 { "Configs" }
        @if t.configs.is_empty() {
            p.muted { "defaults only" }
        } @else {
            table {
                tr { th { "Key" } th { "Value" } }
                @for (k, v) in &t.configs { tr { td { (k) } td { (v) } } }
            }
        }
        h2 { "Delete" }
        @if read_only {
            p.muted { "This console is read-only." }
            button.danger disabled { "Delete topic" }
        } @else {
            form.inline method="post" action={ "/topics/" (t.name) "/delete" }
                data-confirm={ "Delete topic " (t.name) " and all its records? This cannot be undone." } {
                button.danger type="submit" { "Delete topic" }
            }
        }
    };
    layout(&t.name, "Topics", Some(node), body)
}

/// Record bytes as the page's format asks: text (invalid UTF-8 replaced),
/// JSON (indented when it parses, else text), or a hex dump.
pub(super) fn show_bytes(bytes: &[u8], format: Format) -> String {
    match format {
        Format::Text => String::from_utf8_lossy(bytes).into_owned(),
        Format::Json => match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(v) => serde_json::to_string_pretty(&v)
                .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned()),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        },
        Format::Hex => {
            let mut out = String::with_capacity(bytes.len() * 4);
            for (i, line) in bytes.chunks(16).enumerate() {
                let _ = write!(out, "{:08x}  ", i * 16);
                for b in line {
                    let _ = write!(out, "{b:02x} ");
                }
                for _ in line.len()..16 {
                    out.push_str("   ");
                }
                out.push(' ');
                out.extend(line.iter().map(|b| {
                    if b.is_ascii_graphic() || *b == b' ' {
                        char::from(*b)
                    } else {
                        '.'
                    }
                }));
                out.push('\n');
            }
            out
        }
    }
}

fn shown(bytes: Option<&[u8]>, format: Format) -> Markup {
    match bytes {
        None => html! { span.muted { "null" } },
        Some(b) => html! { pre.value { (show_bytes(b, format)) } },
    }
}

#[allow(clippy::too_many_arguments)] // one page, its parts
pub(super) fn browse(
    node: i32,
    topic: &str,
    partition: i32,
    bounds: Option<LogOffsets>,
    from: From,
    format: Format,
    limit: usize,
    records: &[Record],
) -> Markup {
    let (offset_value, time_value) = match from {
        From::Offset(o) => (o.to_string(), String::new()),
        From::Time(ms) => (String::new(), ms.to_string()),
    };
    let body = html! {
        h1 { a href={ "/topics/" (topic) } { (topic) } " / partition " (partition) }
        @if let Some(b) = bounds {
            p.muted { "Offsets " (b.start) " to " (b.end) " (next to be written)." }
        }
        form.browse method="get" {
            label { "From offset" input type="number" name="offset" value=(offset_value) min="0"; }
            label { "or from time (ms or YYYY-MM-DDTHH:MM, UTC)" input type="text" name="time" value=(time_value); }
            label { "Show as"
                select name="format" {
                    @for f in [Format::Text, Format::Json, Format::Hex] {
                        option value=(f.name()) selected[f == format] { (f.name()) }
                    }
                }
            }
            label { "Records" input type="number" name="limit" value=(limit) min="1" max=(super::kafka::MAX_BROWSE); }
            button type="submit" { "Show" }
        }
        @if records.is_empty() {
            p.muted { "No records there." }
        } @else {
            table.records {
                tr { th.num { "Offset" } th { "Timestamp" } th { "Key" } th { "Headers" } th { "Value" } }
                @for r in records {
                    tr {
                        td.num { (r.offset) }
                        td title=[r.timestamp] { (r.timestamp.map_or("-".to_owned(), utc)) }
                        td { (shown(r.key.as_deref(), format)) }
                        td {
                            @for (k, v) in &r.headers {
                                div { (k) ": " (v.as_deref().map_or("null".to_owned(), |v| show_bytes(v, Format::Text))) }
                            }
                        }
                        td { (shown(r.value.as_deref(), format)) }
                    }
                }
            }
        }
    };
    layout(&format!("{topic}/{partition}"), "Topics", Some(node), body)
}

pub(super) fn groups(node: i32, groups: &[GroupSummary]) -> Markup {
    let body = html! {
        h1 { "Consumer groups" }
        @if groups.is_empty() {
            p.muted { "No consumer groups." }
        } @else {
            table {
                tr { th { "Group" } th { "State" } th.num { "Members" } }
                @for g in groups {
                    tr {
                        td { a href={ "/groups/" (segment(&g.name)) } { (g.name) } }
                        td { (g.state) }
                        td.num { (g.members) }
                    }
                }
            }
        }
    };
    layout("Groups", "Groups", Some(node), body)
}

pub(super) fn group(node: i32, name: &str, r: &GroupReport, read_only: bool) -> Markup {
    let lag: i64 = r.partitions.iter().filter_map(|p| p.lag).sum();
    let body = html! {
        h1 { "Group " (name) }
        div.cards {
            (card("State", &r.state))
            (card("Members", r.members.len()))
            (card("Lag", lag))
        }
        h2 { "Lag" }
        (chart("lag", &format!("/console/api/groups/{}/lag", segment(name)), "lag", false, "records behind", "Records not yet committed (all partitions)"))
        h2 { "Members" }
        @if r.members.is_empty() {
            p.muted { "No members." }
        } @else {
            table {
                tr { th { "Member" } th { "Client" } th { "Host" } th { "Assignment" } }
                @for m in &r.members {
                    tr {
                        td { (m.id) }
                        td { (m.client_id) }
                        td { (m.host) }
                        td { @for (t, ps) in &m.assignment { div { (t) ": " (ids(ps)) } } }
                    }
                }
            }
        }
        h2 { "Partitions" }
        table {
            tr { th { "Topic" } th.num { "Partition" } th.num { "Committed" } th.num { "Log end" } th.num { "Lag" } th { "Consumer" } }
            @for p in &r.partitions {
                tr {
                    td { a href={ "/topics/" (p.topic) } { (p.topic) } }
                    td.num { (p.partition) }
                    td.num { (p.committed.map_or("-".to_owned(), |c| c.to_string())) }
                    td.num { (p.log_end) }
                    td.num { (p.lag.map_or("-".to_owned(), |l| l.to_string())) }
                    td { (p.consumer.as_deref().unwrap_or("-")) }
                }
            }
        }
    };
    let topics: std::collections::BTreeSet<&str> =
        r.partitions.iter().map(|p| p.topic.as_str()).collect();
    let reset = html! {
        h2 { "Reset offsets" }
        @if read_only {
            p.muted { "This console is read-only." }
        } @else if !r.members.is_empty() {
            p.muted { "Offsets can be reset only while the group has no members: stop its consumers first." }
        } @else if topics.is_empty() {
            p.muted { "The group has no offsets." }
        } @else {
            form.browse method="post" action={ "/groups/" (segment(name)) "/reset" }
                data-confirm={ "Move the committed offsets of group " (name) "? Its consumers will start from there." } {
                label { "Topic" select name="topic" { @for t in &topics { option value=(t) { (t) } } } }
                label { "To" select name="to" { option value="earliest" { "earliest" } option value="latest" { "latest" } } }
                button.danger type="submit" { "Reset offsets" }
            }
        }
    };
    let body = html! { (body) (reset) };
    layout(name, "Groups", Some(node), body)
}

pub(super) fn cluster(view: &ClusterView) -> Markup {
    let body = html! {
        h1 { "Cluster " (view.cluster_id) }
        @if let Some(stale) = &view.stale {
            div.notice { "This node's view may be out of date: " (stale) }
        }
        h2 { "Nodes" }
        (nodes_table(view))
        h2 { "Under-replicated partitions" }
        (tp_list(&view.under_replicated))
        h2 { "Offline partitions" }
        (tp_list(&view.offline))
        h2 { "Reassignments in progress" }
        (tp_list(&view.reassigning))
    };
    layout("Cluster", "Cluster", Some(view.node_id), body)
}

pub(super) fn queues(node: i32, queues: &[sluice_amqp::QueueInfo]) -> Markup {
    let body = html! {
        h1 { "Queues" }
        @if queues.is_empty() {
            p.muted { "No AMQP queues." }
        } @else {
            table {
                tr { th { "Virtual host" } th { "Queue" } th.num { "Ready" } th.num { "Unacknowledged" } th.num { "Consumers" } th { "Leader" } th { "Flags" } }
                @for q in queues {
                    tr {
                        td { (q.vhost) }
                        td { (q.name) }
                        td.num { (q.messages_ready) }
                        td.num { (q.messages_unacknowledged) }
                        td.num { (q.consumers) }
                        td { @if q.leader < 0 { span.bad { "none" } } @else { (q.leader) } }
                        td.muted {
                            (if q.durable { "durable " } else { "" })
                            (if q.auto_delete { "auto-delete " } else { "" })
                            (if q.exclusive { "exclusive" } else { "" })
                        }
                    }
                }
            }
        }
    };
    layout("Queues", "Queues", Some(node), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_show_as_text_json_or_hex() {
        assert_eq!(show_bytes(b"a\xffb", Format::Text), "a\u{fffd}b");
        assert_eq!(show_bytes(br#"{"a":1}"#, Format::Json), "{\n  \"a\": 1\n}");
        assert_eq!(show_bytes(b"not json", Format::Json), "not json");
        assert_eq!(
            show_bytes(b"AB\x00", Format::Hex),
            format!("00000000  41 42 00 {} AB.\n", "   ".repeat(13))
        );
    }

    #[test]
    fn names_from_users_are_escaped() {
        let page = groups(
            1,
            &[GroupSummary {
                name: "<script>x</script>/g".into(),
                state: "Stable".into(),
                members: 1,
            }],
        )
        .into_string();
        assert!(!page.contains("<script>x"), "{page}");
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;/g"));
        assert!(page.contains("href=\"/groups/%3Cscript%3Ex%3C%2Fscript%3E%2Fg\""));
    }
}
