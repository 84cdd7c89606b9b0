//! `systemctl restart`: the real binary stopped with SIGTERM and started again at once on the
//! same port, while the old connections linger (TIME_WAIT, FIN_WAIT, a client that never
//! closes): the new broker starts and serves. A second broker while one runs is still refused.
mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::bin::{free_port, Midge};
use common::raw::{self, Raw, V311, V5};
use common::WAIT;

#[test]
fn restart_on_the_same_port_at_once_succeeds() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let args = ["-p", &port.to_string(), "--shards", "2"];
    let mut held: Vec<Raw> = Vec::new();
    for round in 0..8 {
        let mut m = Midge::spawn(&args, Some("info"));
        m.wait_listening(addr);
        // Served: a mosquitto client publishes and gets its PUBACK.
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-t", "restart/x", "-m", "up", "-q", "1"])
            .output()
            .expect("mosquitto_pub (Debian's mosquitto-clients) is installed");
        assert!(out.status.success(), "round {round}: {out:?}");
        // Every new connection is accepted by this broker (none lands on a listening socket
        // the previous process left behind).
        for i in 0..8 {
            let mut c = Raw::open(addr);
            c.handshake(&raw::connect(
                V311,
                &format!("restart-probe-{round}-{i}"),
                30,
                true,
            ));
            c.send(&raw::disconnect());
        }
        // Connections that are open when the broker stops: some close when told to (the
        // broker side ends in TIME_WAIT), some never close (FIN_WAIT on the broker side).
        for i in 0..4 {
            let mut c = Raw::open(addr);
            c.handshake(&raw::connect(V5, &format!("restart-{round}-{i}"), 30, true));
            held.push(c);
        }
        let _silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        m.sigterm();
        let st = m
            .wait_exit(Duration::from_secs(15))
            .expect("exits on SIGTERM");
        assert_eq!(st.code(), Some(0), "round {round}: {st}");
        let lines = m.lines();
        assert!(
            !lines.iter().any(|l| l.contains("already in use")),
            "round {round}: {lines:#?}"
        );
        // Half of the held clients close now; the others stay open across the restart.
        for c in held.iter_mut().step_by(2) {
            let _ = c.s.shutdown(std::net::Shutdown::Both);
        }
    }
    // The last start: serves a subscriber and a publisher.
    let mut m = Midge::spawn(&args, Some("info"));
    m.wait_listening(addr);
    common::assert_serves(addr);
    let mut sub = raw::client(addr, V311, "restart-final");
    sub.send(&[0xC0, 0x00]);
    assert_eq!(sub.expect("PINGRESP", WAIT).kind(), 13);
}
