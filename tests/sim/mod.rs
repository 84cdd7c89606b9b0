//! A deterministic simulator for `midge::shardcore`: N shard cores and M scripted MQTT clients
//! in one thread, one seeded RNG choosing what happens next, simulated time, injected faults,
//! and invariants checked after every run. A failing seed replays exactly (`SIM_SEED=...`).
//!
//! What stands in for the outside world:
//! * **Mailboxes**: one bounded FIFO per ordered pair of shards (`mailbox_cap`), as the glommio
//!   mesh. A core's output moves in only while there is room (the rest waits in the core).
//! * **Sockets**: per connection, what the client sent and the driver has not fed yet
//!   (`to_broker`), what the core released and the driver has not written (`wbuf`), and what
//!   sits in the socket for the client to read (`to_client`, at most `sock_cap` packets: a
//!   client that reads slowly pushes back, as TCP does).
//! * **Clients**: MQTT client state machines (QoS 1/2 both ways, client-side QoS 2 de-dup,
//!   a bounded publish window) driven by a random script: connect (clean or persistent, v3.1.1
//!   or v5), subscribe, publish, disconnect, vanish, reconnect storms with the same client id.
//!
//! The driver contract is the one `crate::shard` follows: check `input_paused` before feeding
//! a packet, drain peer output and dirty connections after every input, poll transmit only
//! when the previous batch is written, close once `wants_close` and transmit is drained, call
//! `handle_conn_closed` exactly once.
//!
//! Invariants (see `World::check`):
//! 1. Every acknowledged QoS 1/2 message (PUBACK, or PUBREC for QoS 2, seen by its publisher)
//!    reaches every subscription that was acknowledged (SUBACK seen) before the message was
//!    sent and whose session survives to the end: QoS 1 at least once, QoS 2 exactly once.
//! 2. No message reaches a session that had no matching subscription in that session (a clean
//!    start gets nothing old; nothing goes to a connection that never subscribed).
//! 3. Per publishing connection, first transmissions to a session keep the publish order
//!    (except for share-group members: groups promise no order); the only duplicates are DUP
//!    re-deliveries.
//! 5. Share groups whose members are all persistent and stay: each acknowledged message
//!    reaches one member (QoS 2: exactly one).
//! 4. Every wait ends: after the run quiesces, no registration, move, gate, pause or peer
//!    message is pending on any core, and every client connection got its CONNACK.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use midge::codec::{
    Connect, ConnectProperties, Disconnect, Packet, ProtocolVersion, PubResp, Publish, QoS,
    ReasonCode, Subscribe, SubscriptionOptions, TopicFilter, TopicName, Unsubscribe,
};
use midge::metrics::{DropCause, ShardCounters};
use midge::session::SessionConfig;
use midge::shardcore::{ConnKey, ConnectRequest, CoreConfig, PeerMsg, PersistConfig, ShardCore};

/// SplitMix64: small, fast, and the same on every machine.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// What a run exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Reconnects, takeovers, storms, clean starts; queues large enough that nothing may drop.
    Takeover,
    /// Small queues and slow readers: publishers must be paused, nothing dropped. Subscribers
    /// stay connected (an offline queue keeps mosquitto's limits and may drop).
    Flow,
    /// One subscriber stops reading for good: it is cut loose after `stall_timeout`; every
    /// other subscriber still gets everything.
    Stall,
}

#[derive(Debug, Clone)]
pub struct Params {
    pub shards: usize,
    pub clients: usize,
    pub regime: Regime,
    pub max_queued: usize,
    pub max_inflight: u16,
    pub mailbox_cap: usize,
    pub peer_data_cap: usize,
    /// Script actions per client.
    pub actions: usize,
    pub topics: usize,
}

impl Params {
    pub fn random(rng: &mut Rng, regime: Regime) -> Params {
        let shards = *rng.pick(&[1, 2, 2, 2, 3, 3, 4, 8]);
        let clients = rng.range(3, 7) as usize;
        let max_queued = match regime {
            Regime::Takeover => 100_000,
            Regime::Flow | Regime::Stall => rng.range(2, 12) as usize,
        };
        Params {
            shards,
            clients,
            regime,
            max_queued,
            max_inflight: rng.range(1, 8) as u16,
            mailbox_cap: rng.range(1, 16) as usize,
            peer_data_cap: rng.range(1, 8) as usize,
            actions: rng.range(10, 40) as usize,
            topics: rng.range(1, 3) as usize,
        }
    }
}

/// A message's identity, carried in its payload: publisher client, connection serial, seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId {
    pub client: usize,
    pub conn: u32,
    pub seq: u32,
}

impl MsgId {
    fn payload(self) -> Bytes {
        Bytes::from(format!("{}:{}:{}", self.client, self.conn, self.seq))
    }
    fn parse(b: &[u8]) -> Option<MsgId> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.split(':');
        Some(MsgId {
            client: it.next()?.parse().ok()?,
            conn: it.next()?.parse().ok()?,
            seq: it.next()?.parse().ok()?,
        })
    }
}

#[derive(Debug, Clone)]
struct PubRec {
    topic: String,
    qos: QoS,
    sent_step: u64,
    acked: bool,
    acked_step: u64,
}

#[derive(Debug, Clone)]
struct SubRec {
    client: usize,
    epoch: u32,
    filter: String,
    qos: QoS,
    sent_step: u64,
    acked_step: Option<u64>,
    /// An UNSUBSCRIBE of this filter was sent in the same session (expectations end).
    unsubscribed: bool,
}

/// One PUBLISH as it left the broker for a client (the wire order is the send order).
#[derive(Debug, Clone)]
struct Wire {
    client: usize,
    epoch: u32,
    id: MsgId,
    qos: QoS,
    dup: bool,
    step: u64,
    topic: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Connect,
    /// A persistent client starts clean once (v5: a fresh persistent session; 3.1.1: a
    /// session that ends with the connection).
    CleanConnect,
    Unsubscribe,
    Subscribe,
    Publish,
    Disconnect,
    Vanish,
    Storm,
}

struct Client {
    name: String,
    v5: bool,
    /// Every connect is non-clean with a session that never expires (else: clean, expiry 0).
    persistent: bool,
    publisher: bool,
    subscriber: bool,
    /// Reads with low probability (a slow consumer) — or never during the run (`stuck`).
    slow: bool,
    stuck: bool,
    epoch: u32,
    /// The connection the client uses (latest CONNECT sent).
    current: Option<ConnKey>,
    /// Connection serials: the n-th CONNECT of this client.
    next_serial: u32,
    next_pid: u16,
    next_seq: u32,
    /// Own publishes awaiting their acknowledgement, on the current connection.
    out: BTreeMap<u16, (MsgId, QoS, bool)>,
    window: usize,
    /// QoS 2 packet ids received and not yet released (client side of exactly once).
    qos2_in: BTreeSet<u16>,
    /// SUBSCRIBE packet id → index into `World::subs`.
    pending_subs: HashMap<u16, usize>,
    script: VecDeque<Action>,
    /// App-level receipts per (epoch, message).
    received: HashMap<(u32, MsgId), u32>,
    /// Got a SUBACK (a stuck client stops reading after it).
    subscribed: bool,
    /// Subscribes to this one share group only (one group per member, so the checks can
    /// tell which group a delivery belongs to).
    group_member: Option<&'static str>,
    /// The session of its last connect ends with the connection (expiry 0).
    last_expiry_zero: bool,
    /// A persistent client that started clean at least once.
    ever_clean: bool,
}

struct SimConn {
    key: ConnKey,
    shard: usize,
    client: usize,
    serial: u32,
    epoch: u32,
    to_broker: VecDeque<Packet>,
    wbuf: VecDeque<Packet>,
    to_client: VecDeque<Packet>,
    sock_cap: usize,
    /// The client closed its end: the driver feeds what was sent, then closes.
    client_gone: bool,
    /// The driver closed the socket: the client reads what is left, then sees EOF.
    broker_closed: bool,
    /// `handle_conn_closed` was called.
    core_closed: bool,
    write_stalled: bool,
    got_connack: bool,
    refused: bool,
    /// The client has stopped using it (superseded by a newer connect).
    abandoned_by_client: bool,
}

pub struct World {
    pub seed: u64,
    rng: Rng,
    pub p: Params,
    t0: Instant,
    now: Instant,
    step: u64,
    cores: Vec<ShardCore>,
    /// Records taken from a core by the simulated disk (discarded: recovery is tested apart).
    disk: Vec<u8>,
    counters: Vec<Arc<ShardCounters>>,
    mail: Vec<Vec<VecDeque<PeerMsg>>>,
    conns: BTreeMap<ConnKey, SimConn>,
    clients: Vec<Client>,
    pubs: HashMap<MsgId, PubRec>,
    subs: Vec<SubRec>,
    wire: Vec<Wire>,
    pub trace: Vec<String>,
    verbose: bool,
    quiescing: bool,
}

fn regime_allows_both(r: Regime) -> bool {
    r == Regime::Takeover
}

const FILTERS: &[&str] = &["t/0", "t/1", "t/2", "t/+", "t/#", "#"];
const GROUP_FILTERS: &[&str] = &["$share/g/t/+", "$share/g/t/+", "$share/g/#", "$share/h/t/0"];

impl World {
    pub fn new(seed: u64, regime: Regime) -> World {
        let mut rng = Rng::new(seed);
        let p = Params::random(&mut rng, regime);
        Self::with_params(seed, rng, p)
    }

    pub fn with_params(seed: u64, mut rng: Rng, p: Params) -> World {
        let t0 = Instant::now();
        let session = SessionConfig {
            max_inflight: p.max_inflight,
            max_queued_messages: p.max_queued,
            ..SessionConfig::default()
        };
        let cfg = CoreConfig {
            shards: p.shards,
            session,
            peer_data_cap: p.peer_data_cap,
            max_deferred_input: 4,
            stall_timeout: Duration::from_secs(match p.regime {
                Regime::Stall => 2,
                _ => 3600,
            }),
            // Every third seed runs with persistence on: acknowledgements wait for a simulated
            // disk that confirms records only when time moves (see `advance`).
            persist: (seed % 3 == 0).then_some(PersistConfig {
                base: t0,
                base_ns: 1,
                immediate: false,
                timeout: Duration::from_secs(30),
                // Every other persistent seed bounds the backlog at 200 bytes, so held input (and
                // its release when the disk catches up) runs under the same invariants.
                max_backlog: if seed % 2 == 0 {
                    200
                } else {
                    midge::shardcore::DEFAULT_MAX_BACKLOG
                },
            }),
            ..CoreConfig::default()
        };
        let counters: Vec<Arc<ShardCounters>> = (0..p.shards)
            .map(|_| Arc::new(ShardCounters::default()))
            .collect();
        let cores = (0..p.shards)
            .map(|i| ShardCore::new(i, cfg.clone(), counters[i].clone()))
            .collect();
        let mut clients = Vec::new();
        for i in 0..p.clients {
            let v5 = rng.chance(50);
            // At least one publisher and one subscriber.
            let publisher = i == 0 || (i != 1 && rng.chance(50));
            // Under Flow and Stall a client is one or the other: a subscriber stays connected
            // (offline queues keep mosquitto's limits and may drop), a publisher comes and goes.
            let subscriber =
                i == 1 || !publisher || (regime_allows_both(p.regime) && rng.chance(40));
            let persistent = match p.regime {
                Regime::Takeover => rng.chance(70),
                _ => rng.chance(50),
            };
            let stuck = p.regime == Regime::Stall && i == 1;
            let group_member = (subscriber && !publisher && !stuck && i != 1 && rng.chance(30))
                .then(|| *rng.pick(GROUP_FILTERS));
            let slow_reader = rng.chance(50);
            // Slow readers belong to Flow: under Stall, only the stuck one makes no progress
            // (a slow one may legitimately be cut loose after `stall_timeout`).
            let slow = !stuck && p.regime == Regime::Flow && subscriber && slow_reader;
            let mut script = VecDeque::new();
            script.push_back(Action::Connect);
            if subscriber {
                script.push_back(Action::Subscribe);
            }
            for _ in 0..p.actions {
                let a = match p.regime {
                    Regime::Takeover => match rng.below(100) {
                        0..=49 if publisher => Action::Publish,
                        0..=9 => Action::Subscribe,
                        50..=57 => Action::Subscribe,
                        58..=59 => Action::Unsubscribe,
                        60..=68 => Action::Disconnect,
                        69..=77 => Action::Vanish,
                        78..=87 => Action::Storm,
                        88..=90 if persistent => Action::CleanConnect,
                        _ => Action::Connect,
                    },
                    _ if publisher => match rng.below(100) {
                        0..=84 => Action::Publish,
                        85..=92 => Action::Vanish,
                        _ => Action::Connect,
                    },
                    _ if stuck => break,
                    _ => {
                        if rng.chance(85) {
                            break;
                        }
                        Action::Subscribe
                    }
                };
                script.push_back(a);
            }
            clients.push(Client {
                name: format!("c{i}"),
                v5,
                persistent,
                publisher,
                subscriber,
                slow,
                stuck,
                epoch: 0,
                current: None,
                next_serial: 0,
                next_pid: 1,
                next_seq: 0,
                out: BTreeMap::new(),
                window: rng.range(1, 6) as usize,
                qos2_in: BTreeSet::new(),
                pending_subs: HashMap::new(),
                script,
                received: HashMap::new(),
                subscribed: false,
                group_member,
                last_expiry_zero: false,
                ever_clean: false,
            });
        }
        World {
            seed,
            rng,
            mail: (0..p.shards)
                .map(|_| (0..p.shards).map(|_| VecDeque::new()).collect())
                .collect(),
            p,
            t0,
            now: t0,
            step: 0,
            cores,
            counters,
            conns: BTreeMap::new(),
            clients,
            pubs: HashMap::new(),
            subs: Vec::new(),
            wire: Vec::new(),
            trace: Vec::new(),
            verbose: std::env::var("SIM_TRACE").is_ok(),
            quiescing: false,
            disk: Vec::new(),
        }
    }

    fn log(&mut self, s: String) {
        let line = format!(
            "[{:>6} {:>7.3}s] {s}",
            self.step,
            (self.now - self.t0).as_secs_f64()
        );
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.push(line);
        if self.trace.len() > 4000 && !self.verbose {
            self.trace.drain(..2000);
        }
    }

    /// Run the script, quiesce, check. `Err` carries the failure and the trace tail.
    pub fn run(&mut self) -> Result<(), String> {
        let budget = 20_000 + self.p.clients * self.p.actions * 200;
        let mut steps = 0;
        while self.clients.iter().any(|c| !c.script.is_empty()) {
            steps += 1;
            if steps > budget {
                return Err(self.fail("script did not finish within the step budget"));
            }
            self.random_event(true);
        }
        self.quiesce()?;
        self.check()
    }

    fn fail(&self, why: &str) -> String {
        let mut s = format!(
            "seed {} ({:?}) failed: {why}\nparams: {:?}\nreplay: SIM_SEED={} SIM_REGIME={:?} SIM_TRACE=1 \
             cargo test --release --test simulator replay -- --nocapture\n--- trace tail ---\n",
            self.seed, self.p.regime, self.p, self.seed, self.p.regime
        );
        let _ = writeln!(s, "--- state ---");
        for (i, c) in self.cores.iter().enumerate() {
            let _ = writeln!(
                s,
                "shard {i}: {:?}, next timer {:?}",
                c.is_quiescent(),
                c.poll_timeout().map(|t| t - self.t0)
            );
        }
        for (i, cl) in self.clients.iter().enumerate() {
            let conn = cl.current.and_then(|k| self.conns.get(&k));
            let _ = writeln!(
                s,
                "c{i}: next {:?}, out {}/{} {:?}, conn {:?}",
                cl.script.front(),
                cl.out.len(),
                cl.window,
                cl.out.keys().collect::<Vec<_>>(),
                conn.map(|c| format!(
                    "{:#x} connack={} gone={} closed={} to_broker={} wbuf={} to_client={} paused={}",
                    c.key, c.got_connack, c.client_gone, c.broker_closed, c.to_broker.len(),
                    c.wbuf.len(), c.to_client.len(), self.cores[c.shard].input_paused(c.key)
                ))
            );
        }
        let from = self.trace.len().saturating_sub(80);
        for l in &self.trace[from..] {
            let _ = writeln!(s, "{l}");
        }
        s
    }

    // ---- the scheduler ---------------------------------------------------------------

    /// One step: the RNG picks among everything that can happen now.
    fn random_event(&mut self, scripted: bool) -> bool {
        self.step += 1;
        let mut choices: Vec<u8> = Vec::with_capacity(8);
        let mail_ready = self.mail.iter().flatten().any(|q| !q.is_empty());
        if mail_ready {
            choices.extend([0, 0, 0]);
        }
        let feedable: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| !c.core_closed)
            .filter(|c| {
                (!c.to_broker.is_empty() && !self.cores[c.shard].input_paused(c.key))
                    || (c.to_broker.is_empty() && c.client_gone)
            })
            .map(|c| c.key)
            .collect();
        if !feedable.is_empty() {
            choices.extend([1, 1]);
        }
        let readable: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| !c.to_client.is_empty() && !c.client_gone)
            .filter(|c| {
                let cl = &self.clients[c.client];
                // A stuck client reads its CONNACK and SUBACK, then nothing more.
                self.quiescing || !cl.stuck || !cl.subscribed
            })
            .map(|c| c.key)
            .collect();
        if !readable.is_empty() {
            choices.extend([2, 2]);
        }
        let actors: Vec<usize> = if scripted {
            (0..self.clients.len())
                .filter(|&i| self.can_act(i))
                .collect()
        } else {
            Vec::new()
        };
        if !actors.is_empty() {
            choices.push(3);
        }
        choices.push(4); // time passes
        let c = *self.rng.pick(&choices);
        match c {
            0 => self.deliver_mail(),
            1 => {
                let k = *self.rng.pick(&feedable);
                self.feed(k);
            }
            2 => {
                let k = *self.rng.pick(&readable);
                let cl = self.conns[&k].client;
                if self.clients[cl].slow && !self.quiescing && !self.rng.chance(15) {
                    self.advance(1);
                } else {
                    self.client_read(k);
                }
            }
            3 => {
                let i = *self.rng.pick(&actors);
                self.client_act(i);
            }
            _ => {
                // Time moves in small steps while anything is in flight (a lagging shard is
                // not a dead one: peer timeouts are for dead ones), larger when all is quiet.
                let busy = mail_ready || !feedable.is_empty() || !readable.is_empty();
                let ms = if busy {
                    self.rng.range(0, 20)
                } else {
                    self.rng.range(0, 400)
                };
                self.advance(ms);
            }
        }
        c != 4
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        // The disk: what each core recorded so far is durable once time has moved.
        for s in 0..self.cores.len() {
            if self.cores[s].store_pending() {
                self.disk.clear();
                let upto = self.cores[s].take_store_output(&mut self.disk);
                let now = self.now;
                self.cores[s].handle_durable(upto, now);
                self.service(s);
            }
        }
        for s in 0..self.cores.len() {
            if self.cores[s].poll_timeout().is_some_and(|t| t <= self.now) {
                let now = self.now;
                self.cores[s].handle_tick(now);
                self.service(s);
            }
        }
    }

    fn deliver_mail(&mut self) {
        let ready: Vec<(usize, usize)> = (0..self.mail.len())
            .flat_map(|f| (0..self.mail.len()).map(move |t| (f, t)))
            .filter(|&(f, t)| !self.mail[f][t].is_empty())
            .collect();
        let (from, to) = *self.rng.pick(&ready);
        // A batch, as a receiver drains its mailbox.
        let n = self.rng.range(1, 4);
        for _ in 0..n {
            let Some(m) = self.mail[from][to].pop_front() else {
                break;
            };
            self.log(format!("mail {from}->{to} {}", describe(&m)));
            let now = self.now;
            self.cores[to].handle_peer(from, m, now);
        }
        self.service(to);
        // The sender may now move more into the freed room.
        self.service(from);
    }

    /// Drain a core's outputs, as the driver does after every input.
    fn service(&mut self, s: usize) {
        loop {
            let mut progressed = false;
            let mask = self.cores[s].peers_with_output();
            for peer in 0..self.cores.len() {
                if mask & (1 << peer) == 0 {
                    continue;
                }
                while self.mail[s][peer].len() < self.p.mailbox_cap {
                    let now = self.now;
                    let Some(m) = self.cores[s].poll_peer(peer, now) else {
                        break;
                    };
                    self.mail[s][peer].push_back(m);
                    progressed = true;
                }
            }
            while let Some(k) = self.cores[s].poll_dirty() {
                self.service_conn(k);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
    }

    /// The driver's write side for one connection.
    fn service_conn(&mut self, k: ConnKey) {
        let Some(c) = self.conns.get(&k) else {
            return;
        };
        if c.core_closed {
            return;
        }
        let s = c.shard;
        if c.wbuf.is_empty() {
            let now = self.now;
            let mut got = Vec::new();
            while let Some(p) = self.cores[s].poll_transmit(k, now) {
                got.push(p);
            }
            for p in got {
                self.on_wire(k, &p);
                self.conns.get_mut(&k).unwrap().wbuf.push_back(p);
            }
        }
        self.write_socket(k);
        let c = &self.conns[&k];
        if c.wbuf.is_empty() && !c.core_closed && self.cores[s].wants_close(k) {
            self.close_by_driver(k);
        }
    }

    fn write_socket(&mut self, k: ConnKey) {
        let Some(c) = self.conns.get_mut(&k) else {
            return;
        };
        if c.broker_closed {
            return;
        }
        if c.client_gone {
            c.wbuf.clear(); // nobody reads: the bytes go nowhere (the socket errors out)
        }
        let mut moved = false;
        while c.to_client.len() < c.sock_cap {
            let Some(p) = c.wbuf.pop_front() else {
                break;
            };
            c.to_client.push_back(p);
            moved = true;
        }
        // As the driver reports it: progress ends a stall; a write that cannot complete
        // starts one (the core closes after `write_timeout` without progress).
        let s = c.shard;
        let now = self.now;
        if moved && c.write_stalled {
            c.write_stalled = false;
            self.cores[s].handle_write_stalled(k, false, now);
        }
        let c = self.conns.get_mut(&k).unwrap();
        if !c.wbuf.is_empty() && !c.write_stalled {
            c.write_stalled = true;
            self.cores[s].handle_write_stalled(k, true, now);
        }
    }

    fn close_by_driver(&mut self, k: ConnKey) {
        let c = self.conns.get_mut(&k).unwrap();
        c.broker_closed = true;
        c.core_closed = true;
        let s = c.shard;
        self.log(format!("driver closes {k:#x}"));
        let now = self.now;
        self.cores[s].handle_conn_closed(k, now);
        self.service(s);
    }

    /// The driver reads one packet from a connection (or notices it closed).
    fn feed(&mut self, k: ConnKey) {
        let c = self.conns.get_mut(&k).unwrap();
        let s = c.shard;
        if let Some(p) = c.to_broker.pop_front() {
            self.log(format!("feed {k:#x} {}", pkt(&p)));
            let now = self.now;
            self.cores[s].handle_packet(k, p, now);
        } else {
            c.core_closed = true;
            c.broker_closed = true;
            self.log(format!("driver sees EOF on {k:#x}"));
            let now = self.now;
            self.cores[s].handle_conn_closed(k, now);
        }
        self.service(s);
    }

    /// Record a PUBLISH leaving the broker for a client.
    fn on_wire(&mut self, k: ConnKey, p: &Packet) {
        let c = &self.conns[&k];
        if let Packet::Publish(pb) = p {
            if let Some(id) = MsgId::parse(&pb.payload) {
                let line = format!(
                    "wire {k:#x} -> c{} (session {}) {id:?} q{} pid {}{}",
                    c.client,
                    c.epoch,
                    pb.qos as u8,
                    pb.packet_id,
                    if pb.dup { " DUP" } else { "" }
                );
                self.log(line);
                let c = &self.conns[&k];
                self.wire.push(Wire {
                    client: c.client,
                    epoch: c.epoch,
                    id,
                    qos: pb.qos,
                    dup: pb.dup,
                    step: self.step,
                    topic: pb.topic.as_str().to_string(),
                });
            }
        }
    }

    // ---- clients ----------------------------------------------------------------------

    fn connected(&self, i: usize) -> Option<ConnKey> {
        let k = self.clients[i].current?;
        let c = self.conns.get(&k)?;
        (c.got_connack && !c.refused && !c.broker_closed && !c.client_gone).then_some(k)
    }

    fn can_act(&self, i: usize) -> bool {
        let cl = &self.clients[i];
        let Some(a) = cl.script.front() else {
            return false;
        };
        let live = self.connected(i);
        let pending = cl
            .current
            .and_then(|k| self.conns.get(&k))
            .is_some_and(|c| !c.got_connack && !c.refused && !c.broker_closed && !c.client_gone);
        match a {
            Action::Connect | Action::Storm | Action::CleanConnect => !pending,
            Action::Subscribe | Action::Unsubscribe | Action::Disconnect | Action::Vanish => {
                live.is_some() || !pending
            }
            Action::Publish => {
                live.is_some() && cl.out.len() < cl.window || !pending && live.is_none()
            }
        }
    }

    fn client_act(&mut self, i: usize) {
        let Some(a) = self.clients[i].script.pop_front() else {
            return;
        };
        let live = self.connected(i);
        match a {
            Action::Connect => {
                if live.is_none() {
                    self.connect(i, false);
                }
            }
            Action::CleanConnect => {
                if let Some(k) = live {
                    self.vanish_conn(k);
                }
                self.connect_with(i, false, true);
            }
            Action::Unsubscribe => match live {
                Some(k) => self.unsubscribe(i, k),
                None => self.connect(i, false),
            },
            Action::Storm => {
                // A flapping link: several CONNECTs with the same id, each sent before the
                // previous one's CONNACK (only for persistent sessions: a clean storm has no
                // defined winner).
                if self.clients[i].persistent && !self.clients[i].last_expiry_zero {
                    if let Some(k) = live {
                        self.vanish_conn(k);
                    }
                    let n = self.rng.range(2, 3);
                    for _ in 0..n {
                        self.connect(i, true);
                    }
                } else if live.is_none() {
                    self.connect(i, false);
                }
            }
            Action::Subscribe => match live {
                Some(k) => self.subscribe(i, k),
                None => self.connect(i, false),
            },
            Action::Publish => match live {
                Some(k) => self.publish(i, k),
                None => self.connect(i, false),
            },
            Action::Disconnect => {
                if let Some(k) = live {
                    self.log(format!("{} DISCONNECT on {k:#x}", self.clients[i].name));
                    self.send(k, Packet::Disconnect(Disconnect::default()));
                    self.vanish_conn(k);
                }
            }
            Action::Vanish => {
                if let Some(k) = live {
                    self.log(format!("{} vanishes from {k:#x}", self.clients[i].name));
                    self.vanish_conn(k);
                }
            }
        }
    }

    fn vanish_conn(&mut self, k: ConnKey) {
        if let Some(c) = self.conns.get_mut(&k) {
            c.client_gone = true;
            c.to_client.clear();
            let cl = c.client;
            if self.clients[cl].current == Some(k) {
                self.clients[cl].out.clear();
            }
        }
    }

    fn send(&mut self, k: ConnKey, p: Packet) {
        if let Some(c) = self.conns.get_mut(&k) {
            if !c.client_gone {
                c.to_broker.push_back(p);
            }
        }
    }

    fn connect(&mut self, i: usize, storm: bool) {
        self.connect_with(i, storm, false);
    }

    fn connect_with(&mut self, i: usize, storm: bool, clean: bool) {
        let shard = self.rng.below(self.cores.len() as u64) as usize;
        let key = self.cores[shard].next_conn_key();
        let cl = &mut self.clients[i];
        let clean_start = clean || !cl.persistent;
        // The epoch (session identity) changes with a clean start, and after a session that
        // ended with its connection (expiry 0); never within a storm (storms only resume a
        // persistent session).
        if clean_start || cl.last_expiry_zero || cl.next_serial == 0 {
            cl.epoch += 1;
        }
        if clean && cl.persistent {
            cl.ever_clean = true;
        }
        // 3.1.1 has no expiry: a clean session ends with its connection. A v5 persistent
        // client keeps its session (expiry "never") even when it starts clean.
        cl.last_expiry_zero = !cl.persistent || (clean_start && !cl.v5);
        let _ = storm;
        // A client has one connection at a time: opening a new one closes the old socket
        // (on a flapping link the broker may not have noticed yet; what the client had sent
        // on it is still read by the driver).
        if let Some(old) = cl.current {
            if let Some(c) = self.conns.get_mut(&old) {
                c.abandoned_by_client = true;
                c.client_gone = true;
                c.to_client.clear();
            }
        }
        cl.current = Some(key);
        cl.out.clear();
        cl.next_serial += 1;
        let serial = cl.next_serial;
        let epoch = cl.epoch;
        let version = if cl.v5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        };
        let mut props = ConnectProperties::default();
        if cl.v5 {
            props.session_expiry_interval = Some(if cl.persistent { u32::MAX } else { 0 });
            props.receive_maximum = Some(self.rng.range(1, 10) as u16);
        }
        let connect = Connect {
            protocol: version,
            clean_start,
            keep_alive: 0,
            client_id: ByteString::from(cl.name.clone()),
            will: None,
            username: None,
            password: None,
            properties: props,
        };
        let name = cl.name.clone();
        let sock_cap = if cl.slow || cl.stuck {
            self.rng.range(1, 4) as usize
        } else {
            self.rng.range(2, 64) as usize
        };
        self.conns.insert(
            key,
            SimConn {
                key,
                shard,
                client: i,
                serial,
                epoch,
                to_broker: VecDeque::new(),
                wbuf: VecDeque::new(),
                to_client: VecDeque::new(),
                sock_cap,
                client_gone: false,
                broker_closed: false,
                core_closed: false,
                write_stalled: false,
                got_connack: false,
                refused: false,
                abandoned_by_client: false,
            },
        );
        self.log(format!(
            "{name} CONNECT #{serial} on shard {shard} as {key:#x} (epoch {epoch}{})",
            if storm { ", storm" } else { "" }
        ));
        let req = ConnectRequest {
            client_id: connect.client_id.clone(),
            connect: Box::new(connect),
            config: SessionConfig {
                max_inflight: self.p.max_inflight,
                max_queued_messages: self.p.max_queued,
                ..SessionConfig::default()
            },
            username: None,
            peer: None,
            auth: None,
        };
        let now = self.now;
        self.cores[shard].handle_connect(key, req, now);
        self.service(shard);
    }

    fn subscribe(&mut self, i: usize, k: ConnKey) {
        let f = if let Some(g) = self.clients[i].group_member {
            g
        } else {
            *self.rng.pick(FILTERS)
        };
        let filter = match self.p.topics {
            1 if f.starts_with("t/") && f != "t/+" && f != "t/#" => "t/0",
            _ => f,
        };
        let qos = *self.rng.pick(&[
            QoS::AtLeastOnce,
            QoS::AtLeastOnce,
            QoS::ExactlyOnce,
            QoS::AtMostOnce,
        ]);
        let cl = &mut self.clients[i];
        let pid = cl.next_pid;
        cl.next_pid = cl.next_pid.wrapping_add(1).max(1);
        let idx = self.subs.len();
        self.subs.push(SubRec {
            client: i,
            epoch: cl.epoch,
            filter: filter.to_string(),
            qos,
            sent_step: self.step,
            acked_step: None,
            unsubscribed: false,
        });
        cl.pending_subs.insert(pid, idx);
        let name = cl.name.clone();
        self.log(format!(
            "{name} SUBSCRIBE {filter} q{} on {k:#x}",
            qos as u8
        ));
        let s = Subscribe {
            packet_id: pid,
            filters: vec![(
                TopicFilter::new(filter.to_string()).unwrap(),
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            )],
            properties: Default::default(),
        };
        self.send(k, Packet::Subscribe(s));
    }

    fn unsubscribe(&mut self, i: usize, k: ConnKey) {
        let epoch = self.clients[i].epoch;
        let mine: Vec<String> = self
            .subs
            .iter()
            .filter(|s| s.client == i && s.epoch == epoch && !s.unsubscribed)
            .map(|s| s.filter.clone())
            .collect();
        if mine.is_empty() {
            return;
        }
        let f = self.rng.pick(&mine).clone();
        for s in self.subs.iter_mut() {
            if s.client == i && s.epoch == epoch && s.filter == f {
                s.unsubscribed = true;
            }
        }
        let cl = &mut self.clients[i];
        let pid = cl.next_pid;
        cl.next_pid = cl.next_pid.wrapping_add(1).max(1);
        let name = cl.name.clone();
        self.log(format!("{name} UNSUBSCRIBE {f} on {k:#x}"));
        self.send(
            k,
            Packet::Unsubscribe(Unsubscribe {
                packet_id: pid,
                filters: vec![TopicFilter::new(f).unwrap()],
                user_properties: Vec::new(),
            }),
        );
    }

    fn publish(&mut self, i: usize, k: ConnKey) {
        let topic = format!("t/{}", self.rng.below(self.p.topics as u64));
        let qos = *self.rng.pick(&[
            QoS::AtLeastOnce,
            QoS::AtLeastOnce,
            QoS::ExactlyOnce,
            QoS::AtMostOnce,
        ]);
        let serial = self.conns[&k].serial;
        let cl = &mut self.clients[i];
        cl.next_seq += 1;
        let id = MsgId {
            client: i,
            conn: serial,
            seq: cl.next_seq,
        };
        let pid = if qos == QoS::AtMostOnce {
            0
        } else {
            let mut pid = cl.next_pid;
            while cl.out.contains_key(&pid) || pid == 0 {
                pid = pid.wrapping_add(1);
            }
            cl.next_pid = pid.wrapping_add(1).max(1);
            cl.out.insert(pid, (id, qos, false));
            pid
        };
        self.pubs.insert(
            id,
            PubRec {
                topic: topic.clone(),
                qos,
                sent_step: self.step,
                acked: false,
                acked_step: 0,
            },
        );
        let name = cl.name.clone();
        self.log(format!(
            "{name} PUBLISH {topic} q{} {id:?} pid {pid}",
            qos as u8
        ));
        let p = Publish {
            dup: false,
            qos,
            retain: false,
            topic: TopicName::new(topic).unwrap(),
            packet_id: pid,
            payload: id.payload(),
            properties: Default::default(),
        };
        self.send(k, Packet::Publish(p));
    }

    /// The client reads one packet and reacts as an MQTT client does.
    fn client_read(&mut self, k: ConnKey) {
        let c = self.conns.get_mut(&k).unwrap();
        let Some(p) = c.to_client.pop_front() else {
            return;
        };
        let i = c.client;
        let epoch = c.epoch;
        // Room in the socket: the driver writes more.
        self.write_socket(k);
        self.service_conn(k);
        let current = self.clients[i].current == Some(k);
        let name = self.clients[i].name.clone();
        self.log(format!("{name} reads {} on {k:#x}", pkt(&p)));
        match p {
            Packet::ConnAck(a) => {
                let c = self.conns.get_mut(&k).unwrap();
                if a.reason.is_error() {
                    c.refused = true;
                } else {
                    c.got_connack = true;
                    if !a.session_present {
                        self.clients[i].qos2_in.clear();
                    }
                }
            }
            Packet::Publish(pb) => {
                let id = MsgId::parse(&pb.payload);
                match pb.qos {
                    QoS::AtMostOnce => {
                        if let Some(id) = id {
                            *self.clients[i].received.entry((epoch, id)).or_default() += 1;
                        }
                    }
                    QoS::AtLeastOnce => {
                        if let Some(id) = id {
                            *self.clients[i].received.entry((epoch, id)).or_default() += 1;
                        }
                        self.send(k, Packet::PubAck(PubResp::new(pb.packet_id)));
                    }
                    QoS::ExactlyOnce => {
                        if self.clients[i].qos2_in.insert(pb.packet_id) {
                            if let Some(id) = id {
                                *self.clients[i].received.entry((epoch, id)).or_default() += 1;
                            }
                        }
                        self.send(k, Packet::PubRec(PubResp::new(pb.packet_id)));
                    }
                }
            }
            Packet::PubRel(r) => {
                self.clients[i].qos2_in.remove(&r.packet_id);
                self.send(k, Packet::PubComp(PubResp::new(r.packet_id)));
            }
            Packet::PubAck(r) if current => {
                if let Some((id, _, _)) = self.clients[i].out.remove(&r.packet_id) {
                    if let Some(pr) = self.pubs.get_mut(&id) {
                        pr.acked = true;
                        pr.acked_step = self.step;
                    }
                }
            }
            Packet::PubRec(r) => {
                if current {
                    if let Some((id, _, released)) = self.clients[i].out.get_mut(&r.packet_id) {
                        if let Some(pr) = self.pubs.get_mut(id) {
                            if !pr.acked {
                                pr.acked = true;
                                pr.acked_step = self.step;
                            }
                        }
                        *released = true;
                    }
                }
                self.send(k, Packet::PubRel(PubResp::new(r.packet_id)));
            }
            Packet::PubComp(r) if current => {
                self.clients[i].out.remove(&r.packet_id);
            }
            Packet::SubAck(a) => {
                self.clients[i].subscribed = true;
                if let Some(idx) = self.clients[i].pending_subs.remove(&a.packet_id) {
                    if a.reason_codes.iter().all(|r| !r.is_error()) {
                        self.subs[idx].acked_step = Some(self.step);
                        if let Some(r) = a.reason_codes.first() {
                            // The granted QoS may be lower than asked.
                            self.subs[idx].qos = match r.0 {
                                0 => QoS::AtMostOnce,
                                1 => QoS::AtLeastOnce,
                                _ => QoS::ExactlyOnce,
                            };
                        }
                    }
                }
            }
            Packet::Disconnect(_) => {
                let c = self.conns.get_mut(&k).unwrap();
                c.refused = !c.got_connack;
            }
            _ => {}
        }
    }

    // ---- the end of a run -------------------------------------------------------------

    /// No more scripted actions: persistent clients that are offline come back so their
    /// queues drain, and everything runs until nothing is left to do.
    fn quiesce(&mut self) -> Result<(), String> {
        self.quiescing = true;
        self.log("--- quiesce ---".into());
        for round in 0..3 {
            let mut budget = 400_000;
            loop {
                budget -= 1;
                if budget == 0 {
                    return Err(self.fail("did not quiesce within the step budget"));
                }
                let anything = self.mail.iter().flatten().any(|q| !q.is_empty())
                    || self.conns.values().any(|c| {
                        !c.core_closed
                            && ((!c.to_broker.is_empty()
                                && !self.cores[c.shard].input_paused(c.key))
                                || (c.to_broker.is_empty() && c.client_gone))
                    })
                    || self
                        .conns
                        .values()
                        .any(|c| !c.to_client.is_empty() && !c.client_gone);
                if anything {
                    self.random_event(false);
                    continue;
                }
                // Quiet: let time run to the next timer (at most a few minutes of it).
                let next = self.cores.iter().filter_map(|c| c.poll_timeout()).min();
                match next {
                    Some(t) if t <= self.now + Duration::from_secs(120) => {
                        let ms = (t.saturating_duration_since(self.now).as_millis() as u64).max(1);
                        self.advance(ms);
                    }
                    _ => break,
                }
            }
            if round == 0 {
                // Bring back persistent clients that are not connected.
                for i in 0..self.clients.len() {
                    if self.clients[i].persistent && self.connected(i).is_none() {
                        self.connect(i, false);
                    }
                }
            }
        }
        Ok(())
    }

    pub fn check(&mut self) -> Result<(), String> {
        for (i, c) in self.cores.iter().enumerate() {
            if let Err(e) = c.is_quiescent() {
                return Err(self.fail(&format!("shard {i} not quiescent: {e}")));
            }
        }
        for c in self.conns.values() {
            let cl = &self.clients[c.client];
            if cl.current == Some(c.key)
                && !c.client_gone
                && !c.broker_closed
                && !c.got_connack
                && !c.refused
            {
                let name = cl.name.clone();
                return Err(self.fail(&format!(
                    "{name}: connection {:#x} never got a CONNACK",
                    c.key
                )));
            }
        }
        let stuck: BTreeSet<usize> = (0..self.clients.len())
            .filter(|&i| self.clients[i].stuck)
            .collect();
        // 2 and 3: what went on the wire.
        let mut first: HashMap<(usize, u32, MsgId), usize> = HashMap::new();
        let mut last_seq: HashMap<(usize, u32, usize, u32), (u32, u64)> = HashMap::new();
        for w in &self.wire {
            let ok = self.subs.iter().any(|s| {
                s.client == w.client
                    && s.epoch == w.epoch
                    && TopicFilter::new(s.filter.clone())
                        .unwrap()
                        .matches(&TopicName::new(w.topic.clone()).unwrap())
            });
            if !ok {
                let w = w.clone();
                return Err(self.fail(&format!(
                    "{:?} went to client c{} (session {}) which has no matching subscription in \
                     that session",
                    w.id, w.client, w.epoch
                )));
            }
            if w.qos == QoS::AtMostOnce {
                continue;
            }
            let n = first.entry((w.client, w.epoch, w.id)).or_default();
            *n += 1;
            if !w.dup {
                if *n > 1 && !stuck.contains(&w.client) {
                    let w = w.clone();
                    return Err(self.fail(&format!(
                        "{:?} sent to c{} again without DUP (session {})",
                        w.id, w.client, w.epoch
                    )));
                }
                let key = (w.client, w.epoch, w.id.client, w.id.conn);
                // Share groups promise no order: successive messages may be served by other
                // shards (and, while a member moves, reach it by two paths).
                let group = self.clients[w.client].group_member.is_some();
                if let (false, Some((prev, step))) = (group, last_seq.get(&key)) {
                    if *prev > w.id.seq {
                        let (prev, step) = (*prev, *step);
                        let w = w.clone();
                        return Err(self.fail(&format!(
                            "order: c{} (session {}) got {:?} at step {} after seq {prev} at step {step}",
                            w.client, w.epoch, w.id, w.step
                        )));
                    }
                }
                last_seq.insert(key, (w.id.seq, w.step));
            }
        }
        // 1: every acknowledged message reached every surviving subscription.
        let mut missing = Vec::new();
        let mut ids: Vec<&MsgId> = self.pubs.keys().collect();
        ids.sort();
        for id in ids {
            let pr = &self.pubs[id];
            if !pr.acked || pr.qos == QoS::AtMostOnce {
                continue;
            }
            let topic = TopicName::new(pr.topic.clone()).unwrap();
            for (ci, cl) in self.clients.iter().enumerate() {
                if stuck.contains(&ci) {
                    continue;
                }
                let survives =
                    (cl.persistent && !cl.last_expiry_zero) || self.connected(ci).is_some();
                if !survives {
                    continue;
                }
                // Per filter: in effect if one SUBSCRIBE to it was acknowledged before the
                // message was sent; at the lowest QoS any SUBSCRIBE to it asked for (a
                // re-subscribe replaces the QoS, and a forward may reach the subscriber's shard
                // after the publisher's acknowledgement, so even a later one may apply).
                let mut granted: Option<QoS> = None;
                let mut filters: Vec<&str> = self
                    .subs
                    .iter()
                    .filter(|s| s.client == ci && s.epoch == cl.epoch)
                    .filter(|s| !s.filter.starts_with("$share/"))
                    .map(|s| s.filter.as_str())
                    .collect();
                filters.sort();
                filters.dedup();
                for f in filters {
                    if !TopicFilter::new(f.to_string()).unwrap().matches(&topic) {
                        continue;
                    }
                    let recs = self
                        .subs
                        .iter()
                        .filter(|s| s.client == ci && s.epoch == cl.epoch && s.filter == f);
                    let mut in_effect = false;
                    let mut q = QoS::ExactlyOnce;
                    let recs: Vec<&SubRec> = recs.collect();
                    if recs.iter().any(|r| r.unsubscribed) {
                        continue; // its expectations ended with the UNSUBSCRIBE
                    }
                    for r in recs {
                        if r.acked_step.is_some_and(|a| a < pr.sent_step) {
                            in_effect = true;
                        }
                        q = q.min(r.qos);
                    }
                    if in_effect {
                        granted = granted.max(Some(q));
                    }
                }
                let Some(g) = granted else { continue };
                let eff = pr.qos.min(g);
                if eff == QoS::AtMostOnce {
                    continue;
                }
                let got = cl.received.get(&(cl.epoch, *id)).copied().unwrap_or(0);
                if got == 0 {
                    missing.push(format!(
                        "{id:?} (q{}) never reached {} (session {})",
                        eff as u8, cl.name, cl.epoch
                    ));
                } else if eff == QoS::ExactlyOnce && got > 1 {
                    missing.push(format!("{id:?} reached {} {got} times at QoS 2", cl.name));
                }
            }
        }
        // Share groups: an acknowledged message matching a group reaches one member (QoS 2:
        // exactly one), when the group's membership is stable enough to promise it — every
        // client that ever joined is persistent, never started clean, never left.
        let mut groups: Vec<&str> = self
            .subs
            .iter()
            .filter(|s| s.filter.starts_with("$share/"))
            .map(|s| s.filter.as_str())
            .collect();
        groups.sort();
        groups.dedup();
        for g in groups {
            let gf = TopicFilter::new(g.to_string()).unwrap();
            let recs: Vec<&SubRec> = self.subs.iter().filter(|s| s.filter == g).collect();
            let members: BTreeSet<usize> = recs.iter().map(|r| r.client).collect();
            let stable = members.iter().all(|&m| {
                let c = &self.clients[m];
                c.persistent && !c.ever_clean && !c.last_expiry_zero && !c.stuck && c.epoch == 1
            }) && recs.iter().all(|r| !r.unsubscribed);
            if !stable {
                continue;
            }
            let min_grant = recs.iter().map(|r| r.qos).min().unwrap_or(QoS::AtMostOnce);
            let mut ids: Vec<&MsgId> = self.pubs.keys().collect();
            ids.sort();
            for id in ids {
                let pr = &self.pubs[id];
                if !pr.acked || pr.qos.min(min_grant) == QoS::AtMostOnce {
                    continue;
                }
                if !gf.matches(&TopicName::new(pr.topic.clone()).unwrap()) {
                    continue;
                }
                if !recs
                    .iter()
                    .any(|r| r.acked_step.is_some_and(|a| a < pr.sent_step))
                {
                    continue;
                }
                let got: u32 = members
                    .iter()
                    .map(|&m| {
                        self.clients[m]
                            .received
                            .get(&(1, *id))
                            .copied()
                            .unwrap_or(0)
                    })
                    .sum();
                if got == 0 {
                    missing.push(format!("{id:?} never reached a member of {g}"));
                } else if got > 1 && pr.qos.min(min_grant) == QoS::ExactlyOnce {
                    missing.push(format!("{id:?} reached {g} {got} times at QoS 2"));
                }
            }
        }
        if !missing.is_empty() {
            let n = missing.len();
            missing.truncate(10);
            return Err(self.fail(&format!("{n} promises broken:\n  {}", missing.join("\n  "))));
        }
        // No acknowledged message dropped for a subscriber that was not stalled.
        if self.p.regime != Regime::Stall {
            for (s, c) in self.counters.iter().enumerate() {
                for cause in [DropCause::QueueFull, DropCause::Stalled] {
                    let n = c.dropped(cause);
                    if n > 0 && self.p.regime == Regime::Takeover {
                        return Err(
                            self.fail(&format!("shard {s} dropped {n} messages ({cause:?})"))
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Figures of a finished run, for the soak summary.
    /// Connections whose input was held at the store's backlog bound, over every shard.
    pub fn store_held(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.store_held_inputs.get())
            .sum()
    }

    pub fn summary(&self) -> (usize, usize, usize) {
        let acked = self.pubs.values().filter(|p| p.acked).count();
        (self.step as usize, acked, self.wire.len())
    }
}

fn pkt(p: &Packet) -> String {
    match p {
        Packet::Publish(pb) => format!(
            "PUBLISH {} q{} pid {}{} {}",
            pb.topic.as_str(),
            pb.qos as u8,
            pb.packet_id,
            if pb.dup { " DUP" } else { "" },
            String::from_utf8_lossy(&pb.payload)
        ),
        Packet::ConnAck(a) => format!("CONNACK sp={} rc={:#x}", a.session_present, a.reason.0),
        Packet::PubAck(r) => format!("PUBACK {}", r.packet_id),
        Packet::PubRec(r) => format!("PUBREC {}", r.packet_id),
        Packet::PubRel(r) => format!("PUBREL {}", r.packet_id),
        Packet::PubComp(r) => format!("PUBCOMP {}", r.packet_id),
        Packet::SubAck(a) => format!("SUBACK {} {:?}", a.packet_id, a.reason_codes),
        Packet::Subscribe(s) => format!("SUBSCRIBE {}", s.packet_id),
        Packet::Disconnect(d) => format!("DISCONNECT {:#x}", d.reason.0),
        other => format!("{:?}", other.packet_type()),
    }
}

fn describe(m: &PeerMsg) -> String {
    match m {
        PeerMsg::Forward { fwd, publisher } => format!(
            "Forward {} {} pub {publisher:#x}",
            fwd.message.topic.as_str(),
            String::from_utf8_lossy(&fwd.message.payload)
        ),
        PeerMsg::Register {
            client_id, conn, ..
        } => format!("Register {client_id} {conn:#x}"),
        PeerMsg::Takeover {
            previous,
            conn,
            clean_start,
        } => {
            format!("Takeover {previous:#x} -> {conn:#x} clean={clean_start}")
        }
        PeerMsg::Handover { conn, state } => {
            format!(
                "Handover {conn:#x} state={}",
                state
                    .as_ref()
                    .map_or("none".to_string(), |t| format!("{:#x}", t.from))
            )
        }
        PeerMsg::CutoverRequest { old, new } => format!("CutoverRequest {old:#x}->{new:#x}"),
        PeerMsg::Cutover { old, new } => format!("Cutover {old:#x}->{new:#x}"),
        PeerMsg::CutoverAck { new } => format!("CutoverAck {new:#x}"),
        PeerMsg::ParkDone { conn, msgs } => format!(
            "ParkDone {conn:#x} [{}]",
            msgs.iter()
                .map(|(m, o, _)| format!(
                    "{} q{}",
                    String::from_utf8_lossy(&m.payload),
                    o.qos as u8
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        PeerMsg::Pause { conn } => format!("Pause {conn:#x}"),
        PeerMsg::Resume { conn } => format!("Resume {conn:#x}"),
        other => other.kind().to_string(),
    }
}

/// Unused here, kept for future faults: the reason a v5 client is told on a refused connect.
pub fn _unused(_: ReasonCode) {}
