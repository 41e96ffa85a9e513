//! Where a published message goes: the exchanges of one virtual host compiled from
//! the metadata image into a routing table, rebuilt when the image changes.

use std::collections::{BTreeSet, HashMap};

use amq_protocol::types::{AMQPValue, FieldTable};
use sluice_topology::amqp::{Destination, Vhost};

use crate::model::decode_table;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

#[derive(Debug)]
struct Route {
    routing_key: String,
    /// Topic exchanges: the pattern's words.
    words: Vec<String>,
    /// Headers exchanges: the binding's arguments.
    arguments: FieldTable,
    destination: Destination,
}

#[derive(Debug)]
struct Exchange {
    kind: Kind,
    routes: Vec<Route>,
    alternate: Option<String>,
}

/// One virtual host's exchanges and bindings, ready to route.
#[derive(Debug, Default)]
pub(crate) struct Router {
    exchanges: HashMap<String, Exchange>,
}

/// Exchange-to-exchange hops one message may take; cycles stop here.
const MAX_HOPS: usize = 16;

impl Router {
    pub(crate) fn compile(vhost: Option<&Vhost>) -> Router {
        let mut exchanges = HashMap::new();
        let empty = Vhost::default();
        let v = vhost.unwrap_or(&empty);
        let declared = v
            .exchanges
            .iter()
            .map(|(n, e)| (n.as_str(), e.kind.as_str(), Some(&e.arguments)));
        let predeclared = sluice_topology::amqp::PREDECLARED_EXCHANGES
            .iter()
            .map(|(n, k)| (*n, *k, None));
        for (name, kind, arguments) in predeclared.chain(declared) {
            let kind = match kind {
                "fanout" => Kind::Fanout,
                "topic" => Kind::Topic,
                "headers" => Kind::Headers,
                _ => Kind::Direct,
            };
            let alternate = arguments.map(|a| decode_table(a)).and_then(|t| {
                match t.inner().get("alternate-exchange") {
                    Some(AMQPValue::LongString(s)) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
                    _ => None,
                }
            });
            exchanges.insert(
                name.to_owned(),
                Exchange {
                    kind,
                    routes: Vec::new(),
                    alternate,
                },
            );
        }
        for b in &v.bindings {
            if let Some(e) = exchanges.get_mut(&b.source) {
                e.routes.push(Route {
                    routing_key: b.routing_key.clone(),
                    words: b.routing_key.split('.').map(str::to_owned).collect(),
                    arguments: decode_table(&b.arguments),
                    destination: b.destination.clone(),
                });
            }
        }
        Router { exchanges }
    }

    /// The queues a message published to `exchange` reaches (empty when unroutable);
    /// the default exchange routes to the queue named by the key.
    pub(crate) fn route(
        &self,
        vhost: Option<&Vhost>,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> BTreeSet<String> {
        let mut queues = BTreeSet::new();
        if exchange.is_empty() {
            if vhost.is_some_and(|v| v.queues.contains_key(routing_key)) {
                queues.insert(routing_key.to_owned());
            }
            return queues;
        }
        let mut seen = BTreeSet::new();
        self.route_into(exchange, routing_key, headers, &mut queues, &mut seen, 0);
        queues
    }

    fn route_into(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
        queues: &mut BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        hops: usize,
    ) {
        if hops > MAX_HOPS || !seen.insert(exchange.to_owned()) {
            return;
        }
        let Some(e) = self.exchanges.get(exchange) else {
            return;
        };
        let before = queues.len();
        let key_words: Vec<&str> = if e.kind == Kind::Topic {
            routing_key.split('.').collect()
        } else {
            Vec::new()
        };
        for r in &e.routes {
            let hit = match e.kind {
                Kind::Direct => r.routing_key == routing_key,
                Kind::Fanout => true,
                Kind::Topic => topic_matches(&r.words, &key_words),
                Kind::Headers => headers_match(&r.arguments, headers),
            };
            if !hit {
                continue;
            }
            match &r.destination {
                Destination::Queue(q) => {
                    queues.insert(q.clone());
                }
                Destination::Exchange(x) => {
                    self.route_into(x, routing_key, headers, queues, seen, hops + 1)
                }
            }
        }
        // Routed to no queue: the alternate exchange takes it.
        if queues.len() == before {
            if let Some(alt) = &e.alternate {
                self.route_into(alt, routing_key, headers, queues, seen, hops + 1);
            }
        }
    }
}

/// AMQP topic matching: `*` is exactly one word, `#` zero or more.
pub(crate) fn topic_matches<P: AsRef<str>>(pattern: &[P], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((p, rest)) if p.as_ref() == "#" => {
            (0..=key.len()).any(|skip| topic_matches(rest, &key[skip..]))
        }
        Some((p, rest)) => match key.split_first() {
            Some((k, krest)) => {
                (p.as_ref() == "*" || p.as_ref() == *k) && topic_matches(rest, krest)
            }
            None => false,
        },
    }
}

/// Headers-exchange matching as RabbitMQ does: `x-match` is `all` (the default),
/// `any`, `all-with-x` or `any-with-x`; other `x-` arguments take part only in the
/// `-with-x` forms; a Void argument matches on presence alone.
pub(crate) fn headers_match(arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = match arguments.inner().get("x-match") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => "all".to_owned(),
    };
    let (any, with_x) = match mode.as_str() {
        "any" => (true, false),
        "any-with-x" => (true, true),
        "all-with-x" => (false, true),
        _ => (false, false),
    };
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty).inner();
    let mut checks = arguments
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.as_str().starts_with("x-")))
        .map(|(k, v)| match (v, headers.get(k)) {
            (_, None) => false,
            (AMQPValue::Void, Some(_)) => true,
            (v, Some(h)) => v == h,
        });
    if any {
        checks.any(|m| m)
    } else {
        checks.all(|m| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: topic matching by dynamic programming over (pattern, key) word
    /// positions, written independently of the recursive matcher.
    fn model(pattern: &[&str], key: &[&str]) -> bool {
        let (p, k) = (pattern.len(), key.len());
        // m[i][j]: pattern[i..] matches key[j..]
        let mut m = vec![vec![false; k + 1]; p + 1];
        m[p][k] = true;
        for i in (0..p).rev() {
            for j in (0..=k).rev() {
                m[i][j] = match pattern[i] {
                    "#" => m[i + 1][j] || (j < k && m[i][j + 1]),
                    "*" => j < k && m[i + 1][j + 1],
                    w => j < k && key[j] == w && m[i + 1][j + 1],
                };
            }
        }
        m[0][0]
    }

    #[test]
    fn rabbitmq_tutorial_topic_examples() {
        let cases = [
            ("*.orange.*", "quick.orange.rabbit", true),
            ("*.*.rabbit", "quick.orange.rabbit", true),
            ("lazy.#", "lazy.orange.elephant", true),
            ("*.orange.*", "quick.orange.male.rabbit", false),
            ("lazy.#", "lazy", true),
            ("#", "", true),
            ("*", "", true),
            ("a.*", "a", false),
            ("#.b", "b", true),
            ("a.#.b", "a.b", true),
        ];
        for (pattern, key, want) in cases {
            let p: Vec<&str> = pattern.split('.').collect();
            let k: Vec<&str> = key.split('.').collect();
            assert_eq!(topic_matches(&p, &k), want, "{pattern} ~ {key}");
        }
    }

    fn words() -> impl Strategy<Value = Vec<&'static str>> {
        proptest::collection::vec(prop::sample::select(vec!["a", "b", "c", "*", "#"]), 0..7)
    }

    proptest! {
        #[test]
        fn topic_matching_agrees_with_the_model(
            pattern in words(),
            key in proptest::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..7),
        ) {
            prop_assert_eq!(topic_matches(&pattern, &key), model(&pattern, &key));
        }
    }

    #[test]
    fn headers_matching_follows_x_match() {
        let mut args = FieldTable::default();
        args.insert("format".into(), AMQPValue::LongString("pdf".into()));
        args.insert("x-extra".into(), AMQPValue::LongString("1".into()));
        let mut h = FieldTable::default();
        h.insert("format".into(), AMQPValue::LongString("pdf".into()));
        assert!(
            headers_match(&args, Some(&h)),
            "x- arguments are ignored by default"
        );
        args.insert("x-match".into(), AMQPValue::LongString("all-with-x".into()));
        assert!(!headers_match(&args, Some(&h)));
        args.insert("x-match".into(), AMQPValue::LongString("any".into()));
        assert!(headers_match(&args, Some(&h)));
        assert!(!headers_match(&args, None));
    }
}
