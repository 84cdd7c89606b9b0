//! `midge-loadgen`: a load generator for MQTT brokers (Midge, mosquitto, …).
//!
//! Owns: the command line and dispatch to scenarios. Thread-per-core: one glommio executor
//! pinned per `--cores` entry, each running many connection tasks. See loadgen/README.md.

mod capacity;
mod common;
mod compare;
mod connect;
mod cpu;
mod fleet;
mod limits;
mod net;
mod payload;
mod pubsub;
mod report;
mod sched;
mod seq;
mod stats;
mod storm;
mod tls;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "midge-loadgen",
    version,
    about = "Load generator for MQTT brokers: publish latency without coordinated omission, TLS handshake rate, capacity"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publishers and subscribers: throughput, end-to-end latency, loss/dup/reorder.
    Pubsub(pubsub::PubsubArgs),
    /// Open N connections (TCP / TLS full or resumed), hold them, time each phase.
    Connect(connect::ConnectArgs),
    /// Step the offered rate until p99 exceeds the SLO or messages are lost.
    Capacity(capacity::CapacityArgs),
    /// N devices drop and reconnect at once: time until all are back, latency meanwhile.
    Storm(storm::StormArgs),
    /// A device fleet: N devices (own certificates, mutual TLS) ramp up, idle on keep-alives,
    /// publish QoS 1 telemetry with jitter to backend consumers and receive commands; broker
    /// CPU per message, idle CPU, RSS per device, handshake and end-to-end latency.
    Fleet(fleet::FleetArgs),
    /// (internal) A `fleet --procs` worker process: spec and commands on stdin.
    #[command(hide = true)]
    FleetWorker,
    /// Run one scenario against several brokers (pinned with taskset), alternating, and write
    /// a markdown report with ratios.
    Compare(compare::CompareArgs),
    /// Write a test PKI (ca.crt, ca.key, server.crt, server.key for localhost/127.0.0.1) and
    /// optionally device certificates devices/lg-dN.crt/.key (CN = client id), for --cert-dir.
    Pki {
        #[arg(long)]
        out: PathBuf,
        /// Device certificates to mint into OUT/devices.
        #[arg(long, default_value_t = 0)]
        devices: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("midge-loadgen: error: {e}");
        std::process::exit(2);
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Pubsub(a) => {
            let plan = a.load.plan()?;
            let c = a
                .common
                .validate((plan.publishers + plan.subscribers) as usize)?;
            let r = pubsub::run(&c, &plan)?;
            print!("{}", report::pubsub_table(&r));
            report::pubsub_files(
                &r,
                c.args.json.as_deref(),
                c.args.hgrm.as_deref(),
                c.args.plot.as_deref(),
            )?;
            if r.received == 0 {
                return Err("no message was received".into());
            }
            if !r.errors.is_empty() {
                return Err("connections failed during the run (see errors above)".into());
            }
            Ok(())
        }
        Cmd::Connect(a) => {
            let c = a.common.validate(a.connections as usize)?;
            let r = connect::run(&c, &a)?;
            print!("{}", report::connect_table(&r));
            report::connect_files(
                &r,
                c.args.json.as_deref(),
                c.args.hgrm.as_deref(),
                c.args.plot.as_deref(),
            )?;
            if r.succeeded == 0 {
                return Err("no connection succeeded".into());
            }
            Ok(())
        }
        Cmd::Fleet(a) => {
            let r = fleet::run(&a)?;
            print!("{}", fleet::table(&r));
            if let Some(p) = &a.common.json {
                report::write_json(p, &r)?;
            }
            report::fleet_files(&r, a.common.hgrm.as_deref(), a.common.plot.as_deref())?;
            if r.connected == 0 {
                return Err("no device connected".into());
            }
            if r.failed > 0 || !r.errors.is_empty() {
                return Err(
                    "devices failed to connect or lost their connection (see above)".into(),
                );
            }
            Ok(())
        }
        Cmd::FleetWorker => fleet::child_main(),
        Cmd::Capacity(a) => capacity::run(&a),
        Cmd::Compare(a) => compare::run(&a),
        Cmd::Storm(a) => {
            let c = a.common.validate(a.devices as usize + 2)?;
            let r = storm::run(&c, &a)?;
            print!("{}", storm::table(&r));
            if let Some(p) = &c.args.json {
                report::write_json(p, &r)?;
            }
            if r.reconnected < r.devices {
                return Err("not every device reconnected".into());
            }
            Ok(())
        }
        Cmd::Pki { out, devices } => {
            let (ca, ca_key, srv, srv_key) = tls::make_test_pki(&["localhost", "127.0.0.1"])?;
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            for (n, s) in [
                ("ca.crt", ca),
                ("ca.key", ca_key),
                ("server.crt", srv),
                ("server.key", srv_key),
            ] {
                std::fs::write(out.join(n), s).map_err(|e| format!("{n}: {e}"))?;
            }
            if devices > 0 {
                let ca = std::fs::read_to_string(out.join("ca.crt")).map_err(|e| e.to_string())?;
                let key = std::fs::read_to_string(out.join("ca.key")).map_err(|e| e.to_string())?;
                let m = tls::Minter::new(&ca, &key)?;
                let dir = out.join("devices");
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                for i in 0..devices.min(100_000) {
                    let (crt, key) = m.mint_pem(&format!("lg-d{i}"))?;
                    let w = |n: String, s: String| {
                        std::fs::write(dir.join(&n), s).map_err(|e| format!("{n}: {e}"))
                    };
                    w(format!("lg-d{i}.crt"), crt)?;
                    w(format!("lg-d{i}.key"), key)?;
                }
            }
            println!(
                "wrote ca.crt ca.key server.crt server.key{} to {}",
                if devices > 0 { " devices/" } else { "" },
                out.display()
            );
            Ok(())
        }
    }
}
