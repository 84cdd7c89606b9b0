//! The `capacity` scenario: run `pubsub` at increasing offered rates until p99 exceeds
//! `--slo-p99` or messages are lost (or the broker cannot keep up with the offered rate), and
//! report the highest rate that met the objective.
//!
//! Owns: the stepping policy and its report. Must not touch: the traffic itself (pubsub).

use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::common::{parse_duration, CommonArgs};
use crate::pubsub::{self, LoadArgs};
use crate::stats::Summary;

#[derive(Args, Debug, Clone)]
pub struct CapacityArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// First offered rate (msg/s).
    #[arg(long, default_value_t = 1000.0)]
    pub start_rate: f64,
    /// Each step multiplies the rate by this factor.
    #[arg(long, default_value_t = 1.5)]
    pub step_factor: f64,
    /// Latency objective on p99.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub slo_p99: Duration,
    /// At most this many steps.
    #[arg(long, default_value_t = 12)]
    pub max_steps: u32,
}

#[derive(Serialize)]
struct Step {
    offered: f64,
    sent_rate: f64,
    recv_rate: f64,
    lost: u64,
    latency: Summary,
    ok: bool,
    why: String,
}

#[derive(Serialize)]
struct CapacityReport {
    slo_p99_us: f64,
    highest_sustainable_rate: Option<f64>,
    steps: Vec<Step>,
}

pub fn run(a: &CapacityArgs) -> Result<(), String> {
    if !(a.step_factor > 1.0 && a.step_factor <= 10.0) {
        return Err("--step-factor must be in (1, 10]".into());
    }
    if a.start_rate.is_nan() || a.start_rate <= 0.0 || a.max_steps == 0 || a.max_steps > 100 {
        return Err("--start-rate must be > 0 and --max-steps 1..=100".into());
    }
    let slo_us = a.slo_p99.as_secs_f64() * 1e6;
    let mut steps = Vec::new();
    let mut best = None;
    let mut rate = a.start_rate;
    for _ in 0..a.max_steps {
        let mut load = a.load.clone();
        load.rate = rate;
        let plan = load.plan()?;
        let mut common = a.common.clone();
        common.json = None;
        common.hgrm = None;
        common.plot = None;
        let c = common.validate((plan.publishers + plan.subscribers) as usize)?;
        if !a.common.quiet {
            eprintln!("capacity: offering {rate:.0} msg/s");
        }
        let r = pubsub::run(&c, &plan)?;
        let mut why = Vec::new();
        if r.latency.p99_us > slo_us {
            why.push(format!("p99 {:.0}µs > {slo_us:.0}µs", r.latency.p99_us));
        }
        if r.lost > 0 {
            why.push(format!("{} lost", r.lost));
        }
        if r.send_rate < rate * 0.95 {
            why.push(format!("only {:.0}/s sent", r.send_rate));
        }
        let ok = why.is_empty();
        println!(
            "  offered {:>10.0}/s  recv {:>10.0}/s  p50 {:>8.1}µs  p99 {:>8.1}µs  lost {:>6}  {}",
            rate,
            r.recv_rate,
            r.latency.p50_us,
            r.latency.p99_us,
            r.lost,
            if ok { "ok".to_string() } else { why.join(", ") }
        );
        steps.push(Step {
            offered: rate,
            sent_rate: r.send_rate,
            recv_rate: r.recv_rate,
            lost: r.lost,
            latency: r.latency,
            ok,
            why: why.join(", "),
        });
        if !ok {
            break;
        }
        best = Some(rate);
        rate *= a.step_factor;
    }
    match best {
        Some(b) => {
            println!("highest sustainable rate: {b:.0} msg/s (p99 ≤ {slo_us:.0}µs, no loss)")
        }
        None => println!("no step met the objective (p99 ≤ {slo_us:.0}µs, no loss)"),
    }
    if let Some(p) = &a.common.json {
        crate::report::write_json(
            p,
            &CapacityReport {
                slo_p99_us: slo_us,
                highest_sustainable_rate: best,
                steps,
            },
        )?;
    }
    Ok(())
}
