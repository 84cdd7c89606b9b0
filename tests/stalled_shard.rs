//! A shard that stops answering (a wedged core, simulated with the runtime's stall hook) turns
//! into clear answers for the clients that need it, never a hang: a CONNECT whose home shard
//! is stalled gets CONNACK 0x88 (3.1.1: return code 3), a SUBSCRIBE whose route the stalled
//! shard never confirms gets no SUBACK and its connection is closed; a backlog of control
//! messages for the stalled shard beyond the limit refuses new connections; once the shard
//! runs again, everything works.
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{self, Raw, V311, V5};
use common::{TestBroker, WAIT};
use midge::shard::registry::home_shard;
use midge::shard::StallHook;

/// A client id whose home shard (of 2) is `home`.
fn id_homed_on(home: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| home_shard(id, 2) == home)
        .unwrap()
}

fn stall(hook: &StallHook, shard: usize, on: bool) {
    hook.stall[shard].store(on, Ordering::Release);
    let deadline = Instant::now() + WAIT;
    while hook.stalled[shard].load(Ordering::Acquire) != on {
        assert!(
            Instant::now() < deadline,
            "shard {shard} stall={on} not reached"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The CONNACK's return code (3.1.1) or reason code (v5).
fn connack_code(c: &mut Raw) -> u8 {
    let p = c.expect("CONNACK", WAIT);
    assert_eq!(p.kind(), 2, "{p:?}");
    p.body[1]
}

#[test]
fn a_stalled_shard_gives_clients_clear_answers_not_hangs() {
    let hook = Arc::new(StallHook::new(2));
    let h = hook.clone();
    let b = TestBroker::start_with(2, move |c| {
        c.peer_timeout = Duration::from_millis(500);
        c.stall_hook = Some(h);
        c.mailbox_capacity = 4;
        c.control_backlog_limit = 8;
    });
    stall(&hook, 1, true);

    // Home shard stalled: refused with "server unavailable", in both protocol versions.
    for (version, code) in [(V311, 3), (V5, 0x88)] {
        let mut c = Raw::open(b.shard_addrs[0]);
        c.send(&raw::connect(
            version,
            &id_homed_on(1, "homeless"),
            30,
            true,
        ));
        assert_eq!(connack_code(&mut c), code, "version {version}");
        c.until_closed(WAIT);
    }

    // Home shard fine, but the stalled shard never confirms the SUBSCRIBE's route: no
    // SUBACK, the connection is closed. Each such SUBSCRIBE queues a route for shard 1.
    let mut refused_at = None;
    for i in 0..16 {
        let mut c = Raw::open(b.shard_addrs[0]);
        c.send(&raw::connect(
            V311,
            &id_homed_on(0, &format!("sub{i}")),
            30,
            true,
        ));
        match connack_code(&mut c) {
            0 => {}
            3 => {
                // The backlog for shard 1 passed the limit: new connections are refused.
                refused_at = Some(i);
                break;
            }
            other => panic!("CONNACK {other}"),
        }
        c.send(&raw::subscribe(V311, 1, &[(&format!("stalled/{i}"), 1)]));
        let got = c.until_closed(WAIT);
        assert!(
            got.iter().all(|p| p.kind() != 9),
            "a SUBACK for a route shard 1 never confirmed: {got:?}"
        );
    }
    assert!(
        refused_at.is_some(),
        "16 connects with a growing backlog for the stalled shard were all accepted"
    );

    // The shard runs again: its backlog drains and everyone is served.
    stall(&hook, 1, false);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = Raw::open(b.shard_addrs[0]);
        c.send(&raw::connect(V311, &id_homed_on(1, "back"), 30, true));
        if connack_code(&mut c) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refused after the stall ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    common::assert_serves(b.shard_addrs[0]);
    common::assert_serves(b.shard_addrs[1]);
}
