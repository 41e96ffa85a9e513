//! `sluice bench nexmark`: Nexmark queries q0-q5, q7 and q8 written with
//! the DataStream API (`sluice-stream`), following the Flink Nexmark
//! suite's definitions over bounded input (every window fires at the end),
//! and a single-threaded reference of each for the tests.
//!
//! Result rows (JSON lines with `--output`): q0, q1, q7: auction, bidder,
//! price, date_time, extra; q2: auction, price; q3: name, city, state, id;
//! q4: category, avg (the final value per category); q5: auction, num,
//! window_start; q8: id, name, starttime. Times are epoch milliseconds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
pub use sluice_stream::nexmark::NexmarkConfig;
use sluice_stream::nexmark::{Auction, Bid, Event, Person};
use sluice_stream::{
    DataStream, Either, KeyedProcess, KeyedState, ProcessContext, Record, StreamEnv, StreamError,
    SubtaskInfo, TimeWindow, Windows,
};

/// The queries of the suite that are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    Q0,
    Q1,
    Q2,
    Q3,
    Q4,
    Q5,
    Q7,
    Q8,
}

impl Query {
    pub const ALL: [Query; 8] = [
        Query::Q0,
        Query::Q1,
        Query::Q2,
        Query::Q3,
        Query::Q4,
        Query::Q5,
        Query::Q7,
        Query::Q8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Query::Q0 => "q0",
            Query::Q1 => "q1",
            Query::Q2 => "q2",
            Query::Q3 => "q3",
            Query::Q4 => "q4",
            Query::Q5 => "q5",
            Query::Q7 => "q7",
            Query::Q8 => "q8",
        }
    }

    pub fn parse(name: &str) -> Option<Query> {
        Query::ALL
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(name))
    }
}

/// What `run` does.
#[derive(Clone, Debug)]
pub struct NexmarkRun {
    pub query: Query,
    pub events: u64,
    /// The generator's configuration ([`config`]: the default with a
    /// fixed base time).
    pub config: NexmarkConfig,
    pub parallelism: usize,
    /// Where the result rows go as JSON lines (none: counted only).
    pub output: Option<PathBuf>,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct NexmarkReport {
    pub query: Query,
    pub events: u64,
    pub rows: u64,
    pub seconds: f64,
    /// Process CPU time over the run (all threads).
    pub cpu_seconds: f64,
}

impl NexmarkReport {
    /// Events per second per core used: events over CPU seconds (the
    /// Nexmark runner's measure; a job that leaves a core idle is not
    /// credited for it).
    pub fn events_per_sec_per_core(&self) -> f64 {
        self.events as f64 / self.cpu_seconds.max(1e-9)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "mode": "nexmark",
            "query": self.query.name(),
            "events": self.events,
            // The suite's report reads these two.
            "records": self.events,
            "records_per_sec": self.events_per_sec_per_core(),
            "rows": self.rows,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "events_per_sec": self.events as f64 / self.seconds.max(1e-9),
            "events_per_sec_per_core": self.events_per_sec_per_core(),
        })
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum NexmarkError {
    #[error(transparent)]
    Job(#[from] StreamError),
    #[error("writing results: {0}")]
    Output(#[from] std::io::Error),
}

/// The generator's default configuration with `base_time` fixed.
pub fn config(base_time: u64) -> NexmarkConfig {
    NexmarkConfig {
        base_time,
        ..NexmarkConfig::default()
    }
}

/// One result row.
#[derive(Clone, Debug, PartialEq)]
pub enum Row {
    /// q0, q7.
    Bid(Bid),
    /// q1: the price in euros.
    BidEuros(Bid, f64),
    /// q2.
    AuctionPrice { auction: usize, price: usize },
    /// q3.
    LocalItem {
        name: String,
        city: String,
        state: String,
        id: usize,
    },
    /// q4: Flink's AVG over BIGINT, a BIGINT (truncated).
    CategoryAvg { category: usize, avg: u64 },
    /// q5.
    HotItem {
        auction: usize,
        num: u64,
        window_start: i64,
    },
    /// q8.
    NewUser {
        id: usize,
        name: String,
        starttime: i64,
    },
}

impl Row {
    pub fn to_json(&self) -> Value {
        let bid = |b: &Bid, price: Value| {
            json!({"auction": b.auction, "bidder": b.bidder, "price": price,
                   "date_time": b.date_time, "extra": b.extra})
        };
        match self {
            Row::Bid(b) => bid(b, json!(b.price)),
            Row::BidEuros(b, euros) => bid(b, json!(euros)),
            Row::AuctionPrice { auction, price } => json!({"auction": auction, "price": price}),
            Row::LocalItem {
                name,
                city,
                state,
                id,
            } => json!({"name": name, "city": city, "state": state, "id": id}),
            Row::CategoryAvg { category, avg } => json!({"category": category, "avg": avg}),
            Row::HotItem {
                auction,
                num,
                window_start,
            } => json!({"auction": auction, "num": num, "window_start": window_start}),
            Row::NewUser {
                id,
                name,
                starttime,
            } => json!({"id": id, "name": name, "starttime": starttime}),
        }
    }
}

const SECOND: i64 = 1000;
/// q2's selection: auctions whose id is a multiple of this.
const Q2_MODULUS: usize = 123;
/// q3's category and states (the crate spells states in lower case).
const Q3_CATEGORY: usize = 10;
const Q3_STATES: [&str; 3] = ["or", "id", "ca"];

fn bids(events: DataStream<Event>) -> DataStream<Bid> {
    events.flat_map(|e| match e {
        Event::Bid(b) => Some(b),
        _ => None,
    })
}

/// Builds query `q` over `events`; its rows.
fn build(q: Query, env: &StreamEnv, events: u64, config: &NexmarkConfig) -> DataStream<Row> {
    let source = || env.nexmark(events, config.clone());
    match q {
        Query::Q0 => bids(source()).map(Row::Bid),
        Query::Q1 => bids(source()).map(|b| {
            let euros = 0.908 * b.price as f64;
            Row::BidEuros(b, euros)
        }),
        Query::Q2 => bids(source())
            .filter(|b| b.auction % Q2_MODULUS == 0)
            .map(|b| Row::AuctionPrice {
                auction: b.auction,
                price: b.price,
            }),
        Query::Q3 => source()
            .flat_map(|e| match e {
                Event::Person(p) if Q3_STATES.iter().any(|s| p.state.eq_ignore_ascii_case(s)) => {
                    Some(Either::Left(p))
                }
                Event::Auction(a) if a.category == Q3_CATEGORY => Some(Either::Right(a)),
                _ => None,
            })
            .key_by(|e| match e {
                Either::Left(p) => p.id,
                Either::Right(a) => a.seller,
            })
            .process("q3 join", LocalItemJoin::new),
        Query::Q4 => {
            let events = source();
            let keyed = events
                .flat_map(|e| match e {
                    Event::Auction(a) => Some(Either::Left(a)),
                    Event::Bid(b) => Some(Either::Right(b)),
                    Event::Person(_) => None,
                })
                .key_by(|e| match e {
                    Either::Left(a) => a.id,
                    Either::Right(b) => b.auction,
                });
            keyed
                .process("q4 winning bids", WinningBid::new)
                .key_by(|(category, _)| *category)
                .process("q4 average", CategoryAverage::new)
        }
        Query::Q5 => bids(source())
            .key_by(|b| b.auction)
            .window(Windows::sliding(
                Duration::from_secs(10),
                Duration::from_secs(2),
            ))
            .aggregate(
                || 0u64,
                |n, _| *n += 1,
                |n, m| *n += m,
                |auction: &usize, w: &TimeWindow, n: &u64| (*auction, w.start, *n),
            )
            .key_by(|(_, start, _)| *start)
            .process("q5 hottest", Hottest::new),
        Query::Q7 => bids(source())
            .flat_map(|b| {
                // A bid at a window's last millisecond also counts for the
                // next window (the query's BETWEEN is inclusive).
                let t = b.date_time as i64;
                let own = t.div_euclid(10 * SECOND);
                let last_ms = t.rem_euclid(10 * SECOND) == 10 * SECOND - 1;
                let next = last_ms.then(|| (own + 1, b.clone(), true));
                std::iter::once((own, b, false)).chain(next)
            })
            .key_by(|(window, _, _)| *window)
            .process("q7 highest", HighestBid::new),
        Query::Q8 => source()
            .flat_map(people_and_auctions)
            .key_by(|e| match e {
                Either::Left(p) => p.id,
                Either::Right(a) => a.seller,
            })
            .window(Windows::tumbling(Duration::from_secs(10)))
            .process(
                |id: &usize, w: &TimeWindow, all: &[Either<Person, Auction>]| {
                    let sold = all.iter().any(|e| matches!(e, Either::Right(_)));
                    let mut names: Vec<&str> = all
                        .iter()
                        .filter_map(|e| match e {
                            Either::Left(p) if sold => Some(p.name.as_str()),
                            _ => None,
                        })
                        .collect();
                    names.sort();
                    names.dedup();
                    names
                        .into_iter()
                        .map(|name| Row::NewUser {
                            id: *id,
                            name: name.to_owned(),
                            starttime: w.start,
                        })
                        .collect::<Vec<_>>()
                },
            ),
    }
}

/// A source's people and auctions, as one stream of two kinds (one source
/// feeds both sides of the join).
fn people_and_auctions(e: Event) -> Option<Either<Person, Auction>> {
    match e {
        Event::Person(p) => Some(Either::Left(p)),
        Event::Auction(a) => Some(Either::Right(a)),
        Event::Bid(_) => None,
    }
}

/// q3: auctions of category 10 by sellers in OR, ID or CA, joined to
/// their seller as soon as both are seen.
struct LocalItemJoin {
    people: KeyedState<usize, Person>,
    waiting: KeyedState<usize, Vec<usize>>,
}

impl LocalItemJoin {
    fn new(info: SubtaskInfo) -> Self {
        LocalItemJoin {
            people: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
            waiting: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
        }
    }
}

fn local_item(p: &Person, auction: usize) -> Row {
    Row::LocalItem {
        name: p.name.clone(),
        city: p.city.clone(),
        state: p.state.clone(),
        id: auction,
    }
}

impl KeyedProcess<usize, Either<Person, Auction>, Row> for LocalItemJoin {
    fn process(
        &mut self,
        key: &usize,
        record: Record<Either<Person, Auction>>,
        ctx: &mut ProcessContext<'_, usize, Row>,
    ) {
        match record.value {
            Either::Left(p) => {
                for auction in self.waiting.remove(key).unwrap_or_default() {
                    ctx.emit(local_item(&p, auction));
                }
                self.people.insert(*key, p);
            }
            Either::Right(a) => match self.people.get(key) {
                Some(p) => {
                    let row = local_item(p, a.id);
                    ctx.emit(row);
                }
                None => {
                    let mut w = self.waiting.remove(key).unwrap_or_default();
                    w.push(a.id);
                    self.waiting.insert(*key, w);
                }
            },
        }
    }
}

/// q4, first half: an auction's winning bid, the highest bid placed
/// between its start and its expiry, once the watermark passes the expiry.
struct WinningBid {
    auctions: KeyedState<usize, AuctionBids>,
}

/// Where an auction stands for q4.
enum AuctionBids {
    /// Bids seen before the auction: (time, price).
    Waiting(Vec<(u64, usize)>),
    Open {
        category: usize,
        start: u64,
        expires: u64,
        best: Option<usize>,
    },
    /// Its result went out; later bids cannot count.
    Closed,
}

impl WinningBid {
    fn new(info: SubtaskInfo) -> Self {
        WinningBid {
            auctions: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
        }
    }
}

fn better(
    best: Option<usize>,
    (time, price): (u64, usize),
    start: u64,
    expires: u64,
) -> Option<usize> {
    if time >= start && time <= expires {
        Some(best.map_or(price, |b| b.max(price)))
    } else {
        best
    }
}

impl KeyedProcess<usize, Either<Auction, Bid>, (usize, usize)> for WinningBid {
    fn process(
        &mut self,
        key: &usize,
        record: Record<Either<Auction, Bid>>,
        ctx: &mut ProcessContext<'_, usize, (usize, usize)>,
    ) {
        let state = self
            .auctions
            .remove(key)
            .unwrap_or(AuctionBids::Waiting(Vec::new()));
        let next = match (state, record.value) {
            (AuctionBids::Waiting(early), Either::Left(a)) => {
                ctx.register_event_time_timer(i64::try_from(a.expires).unwrap_or(i64::MAX));
                let best = early
                    .into_iter()
                    .fold(None, |best, bid| better(best, bid, a.date_time, a.expires));
                AuctionBids::Open {
                    category: a.category,
                    start: a.date_time,
                    expires: a.expires,
                    best,
                }
            }
            (AuctionBids::Waiting(mut early), Either::Right(b)) => {
                early.push((b.date_time, b.price));
                AuctionBids::Waiting(early)
            }
            (
                AuctionBids::Open {
                    category,
                    start,
                    expires,
                    best,
                },
                Either::Right(b),
            ) => AuctionBids::Open {
                category,
                start,
                expires,
                best: better(best, (b.date_time, b.price), start, expires),
            },
            // An auction id is never reused; a closed auction stays closed.
            (other, _) => other,
        };
        self.auctions.insert(*key, next);
    }

    fn on_timer(
        &mut self,
        key: &usize,
        _: i64,
        ctx: &mut ProcessContext<'_, usize, (usize, usize)>,
    ) {
        if let Some(AuctionBids::Open {
            category,
            best: Some(price),
            ..
        }) = self.auctions.remove(key)
        {
            ctx.emit((category, price));
        }
        self.auctions.insert(*key, AuctionBids::Closed);
    }
}

/// q4, second half: the running average of winning prices per category.
struct CategoryAverage {
    sums: KeyedState<usize, (u128, u64)>,
}

impl CategoryAverage {
    fn new(info: SubtaskInfo) -> Self {
        CategoryAverage {
            sums: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
        }
    }
}

impl KeyedProcess<usize, (usize, usize), Row> for CategoryAverage {
    fn process(
        &mut self,
        key: &usize,
        record: Record<(usize, usize)>,
        ctx: &mut ProcessContext<'_, usize, Row>,
    ) {
        let (sum, n) = self.sums.remove(key).unwrap_or_default();
        let (sum, n) = (sum + record.value.1 as u128, n + 1);
        self.sums.insert(*key, (sum, n));
        ctx.emit(Row::CategoryAvg {
            category: *key,
            avg: u64::try_from(sum / u128::from(n)).unwrap_or(u64::MAX),
        });
    }
}

/// q5, second half: per sliding window, the auctions with the most bids.
struct Hottest {
    /// Per window start: the best count and the auctions that reached it.
    windows: KeyedState<i64, (u64, Vec<usize>)>,
}

impl Hottest {
    fn new(info: SubtaskInfo) -> Self {
        Hottest {
            windows: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
        }
    }
}

impl KeyedProcess<i64, (usize, i64, u64), Row> for Hottest {
    fn process(
        &mut self,
        key: &i64,
        record: Record<(usize, i64, u64)>,
        ctx: &mut ProcessContext<'_, i64, Row>,
    ) {
        let (auction, _, n) = record.value;
        let (best, mut top) = self.windows.remove(key).unwrap_or_default();
        let best = if n > best {
            top.clear();
            n
        } else {
            best
        };
        if n == best {
            top.push(auction);
        }
        self.windows.insert(*key, (best, top));
        // Window results carry the window's last millisecond: every count
        // of this window has arrived when the watermark passes it.
        if let Some(t) = record.time {
            ctx.register_event_time_timer(t);
        }
    }

    fn on_timer(&mut self, key: &i64, _: i64, ctx: &mut ProcessContext<'_, i64, Row>) {
        if let Some((best, top)) = self.windows.remove(key) {
            for auction in top {
                ctx.emit(Row::HotItem {
                    auction,
                    num: best,
                    window_start: *key,
                });
            }
        }
    }
}

/// q7: per 10 s window, the bids at its highest price, placed from the
/// window's start - 1 ms to its end - 1 ms (the query's inclusive BETWEEN).
struct HighestBid {
    /// Per window: the highest price of its own bids, the bids at it, and
    /// the previous window's last-millisecond bids.
    windows: KeyedState<i64, (usize, Vec<Bid>, Vec<Bid>)>,
}

impl HighestBid {
    fn new(info: SubtaskInfo) -> Self {
        HighestBid {
            windows: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
        }
    }
}

impl KeyedProcess<i64, (i64, Bid, bool), Row> for HighestBid {
    fn process(
        &mut self,
        key: &i64,
        record: Record<(i64, Bid, bool)>,
        ctx: &mut ProcessContext<'_, i64, Row>,
    ) {
        let (window, bid, from_before) = record.value;
        let (mut max, mut top, mut edge) = self.windows.remove(key).unwrap_or_default();
        if from_before {
            edge.push(bid);
        } else {
            if bid.price > max || top.is_empty() {
                max = bid.price;
                top.clear();
            }
            if bid.price == max {
                top.push(bid);
            }
        }
        self.windows.insert(*key, (max, top, edge));
        ctx.register_event_time_timer((window + 1) * 10 * SECOND - 1);
    }

    fn on_timer(&mut self, key: &i64, _: i64, ctx: &mut ProcessContext<'_, i64, Row>) {
        if let Some((max, top, edge)) = self.windows.remove(key) {
            if top.is_empty() {
                return; // only the previous window's edge: no max of its own
            }
            for b in edge.into_iter().filter(|b| b.price == max).chain(top) {
                ctx.emit(Row::Bid(b));
            }
        }
    }
}

/// Runs one query to the end of its events.
pub fn run(spec: &NexmarkRun) -> Result<(NexmarkReport, Vec<Row>), NexmarkError> {
    let env = StreamEnv::new();
    env.set_parallelism(spec.parallelism.max(1));
    let rows = build(spec.query, &env, spec.events, &spec.config);
    let count = Arc::new(AtomicU64::new(0));
    let kept: Arc<Mutex<Vec<Row>>> = Arc::new(Mutex::new(Vec::new()));
    let keep = spec.output.is_some();
    {
        let (count, kept) = (count.clone(), kept.clone());
        rows.for_each(move |r| {
            count.fetch_add(1, Ordering::Relaxed);
            if keep {
                kept.lock().unwrap_or_else(|p| p.into_inner()).push(r.value);
            }
        });
    }
    let cpu0 = crate::schedule::process_cpu_seconds();
    let t0 = Instant::now();
    env.execute(spec.query.name())?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds = crate::schedule::process_cpu_seconds() - cpu0;
    let mut rows = std::mem::take(&mut *kept.lock().unwrap_or_else(|p| p.into_inner()));
    if spec.query == Query::Q4 {
        rows = final_per_category(rows);
    }
    if let Some(path) = &spec.output {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for r in &rows {
            writeln!(out, "{}", r.to_json())?;
        }
        out.flush()?;
    }
    let report = NexmarkReport {
        query: spec.query,
        events: spec.events,
        rows: count.load(Ordering::Relaxed),
        seconds,
        cpu_seconds,
    };
    Ok((report, rows))
}

/// q4's rows are updates; the result is each category's last.
fn final_per_category(rows: Vec<Row>) -> Vec<Row> {
    let mut last: BTreeMap<usize, Row> = BTreeMap::new();
    for r in rows {
        if let Row::CategoryAvg { category, .. } = r {
            last.insert(category, r);
        }
    }
    last.into_values().collect()
}

/// The events of `config`, in order, single-threaded.
pub fn generate(events: u64, config: &NexmarkConfig) -> Vec<Event> {
    sluice_stream::nexmark::EventGenerator::new(config.clone())
        .take(usize::try_from(events).unwrap_or(usize::MAX))
        .collect()
}

/// Each query computed directly from the SQL definition, one event at a
/// time; for the tests.
pub fn reference(q: Query, events: &[Event]) -> Vec<Row> {
    let bids = || {
        events.iter().filter_map(|e| match e {
            Event::Bid(b) => Some(b),
            _ => None,
        })
    };
    let window_of = |t: u64| (t as i64).div_euclid(10 * SECOND) * 10 * SECOND;
    match q {
        Query::Q0 => bids().map(|b| Row::Bid(b.clone())).collect(),
        Query::Q1 => bids()
            .map(|b| Row::BidEuros(b.clone(), 0.908 * b.price as f64))
            .collect(),
        Query::Q2 => bids()
            .filter(|b| b.auction % Q2_MODULUS == 0)
            .map(|b| Row::AuctionPrice {
                auction: b.auction,
                price: b.price,
            })
            .collect(),
        Query::Q3 => {
            let people: HashMap<usize, &Person> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Person(p)
                        if Q3_STATES.iter().any(|s| p.state.eq_ignore_ascii_case(s)) =>
                    {
                        Some((p.id, p))
                    }
                    _ => None,
                })
                .collect();
            events
                .iter()
                .filter_map(|e| match e {
                    Event::Auction(a) if a.category == Q3_CATEGORY => {
                        people.get(&a.seller).map(|p| local_item(p, a.id))
                    }
                    _ => None,
                })
                .collect()
        }
        Query::Q4 => {
            let mut by_auction: HashMap<usize, Vec<&Bid>> = HashMap::new();
            for b in bids() {
                by_auction.entry(b.auction).or_default().push(b);
            }
            let mut sums: BTreeMap<usize, (u128, u64)> = BTreeMap::new();
            for e in events {
                if let Event::Auction(a) = e {
                    let best = by_auction
                        .get(&a.id)
                        .into_iter()
                        .flatten()
                        .filter(|b| b.date_time >= a.date_time && b.date_time <= a.expires)
                        .map(|b| b.price)
                        .max();
                    if let Some(p) = best {
                        let s = sums.entry(a.category).or_default();
                        s.0 += p as u128;
                        s.1 += 1;
                    }
                }
            }
            sums.into_iter()
                .map(|(category, (s, n))| Row::CategoryAvg {
                    category,
                    avg: u64::try_from(s / u128::from(n)).unwrap_or(u64::MAX),
                })
                .collect()
        }
        Query::Q5 => {
            // Windows [2 s * i, 2 s * i + 10 s): a bid at t is in those
            // with ceil((t - 10 s + 1) / 2 s) <= i <= floor(t / 2 s).
            let mut counts: BTreeMap<i64, HashMap<usize, u64>> = BTreeMap::new();
            for b in bids() {
                let t = b.date_time as i64;
                let first = -(-(t - 10 * SECOND + 1)).div_euclid(2 * SECOND);
                for i in first..=t.div_euclid(2 * SECOND) {
                    *counts
                        .entry(i * 2 * SECOND)
                        .or_default()
                        .entry(b.auction)
                        .or_default() += 1;
                }
            }
            let mut rows = Vec::new();
            for (start, per_auction) in counts {
                let best = per_auction.values().copied().max().unwrap_or(0);
                for (auction, n) in per_auction {
                    if n == best {
                        rows.push(Row::HotItem {
                            auction,
                            num: n,
                            window_start: start,
                        });
                    }
                }
            }
            rows
        }
        Query::Q7 => {
            let mut max: BTreeMap<i64, usize> = BTreeMap::new();
            for b in bids() {
                let m = max.entry(window_of(b.date_time)).or_default();
                *m = (*m).max(b.price);
            }
            // A row per bid and window whose [end - 1 - 10 s, end - 1]
            // holds the bid and whose highest price it is.
            max.iter()
                .flat_map(|(start, m)| {
                    let rowtime = start + 10 * SECOND - 1;
                    bids().filter(move |b| {
                        let t = b.date_time as i64;
                        b.price == *m && t >= rowtime - 10 * SECOND && t <= rowtime
                    })
                })
                .map(|b| Row::Bid(b.clone()))
                .collect()
        }
        Query::Q8 => {
            let mut sellers: HashSet<(usize, i64)> = HashSet::new();
            for e in events {
                if let Event::Auction(a) = e {
                    sellers.insert((a.seller, window_of(a.date_time)));
                }
            }
            let mut rows: Vec<(usize, String, i64)> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Person(p) if sellers.contains(&(p.id, window_of(p.date_time))) => {
                        Some((p.id, p.name.clone(), window_of(p.date_time)))
                    }
                    _ => None,
                })
                .collect();
            rows.sort();
            rows.dedup();
            rows.into_iter()
                .map(|(id, name, starttime)| Row::NewUser {
                    id,
                    name,
                    starttime,
                })
                .collect()
        }
    }
}
