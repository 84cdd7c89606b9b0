//! CPU and memory self-measurement, and of a broker process by pid.
//!
//! Owns: reading getrusage(RUSAGE_SELF) and /proc/PID/{stat,status}. Must not touch: anything
//! else. These readings let a run say whether the loadgen itself was the bottleneck, and
//! give the broker's CPU per message/handshake independently of whether the loadgen saturated.

use std::time::Duration;

/// User + system CPU time consumed by this process so far.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass; zeroed is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage, RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime of process `pid` from /proc/PID/stat; None if it cannot be read.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&s, clock_ticks())
}

/// Parse utime (field 14) and stime (field 15) of a /proc/PID/stat line. The command name
/// (field 2) is in parentheses and may contain spaces, so fields are counted after the last ')'.
pub fn parse_stat_cpu(stat: &str, ticks_per_sec: u64) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    let ticks = ut + st;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / ticks_per_sec))
}

/// (time on CPU, time runnable but waiting for a CPU) in ns, from a `schedstat` file. The
/// wait shows when other processes starve the loadgen or the broker: throughput figures are
/// then the machine's, not the broker's (CPU per message stays valid).
pub fn parse_schedstat(s: &str) -> Option<(u64, u64)> {
    let mut it = s.split_whitespace();
    let run = it.next()?.parse().ok()?;
    let wait = it.next()?.parse().ok()?;
    Some((run, wait))
}

/// Scheduler statistics of the calling thread.
pub fn thread_schedstat() -> Option<(u64, u64)> {
    parse_schedstat(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

/// Scheduler statistics of process `pid`, summed over its threads.
pub fn proc_schedstat(pid: u32) -> Option<(u64, u64)> {
    let mut tot = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let p = t.ok()?.path().join("schedstat");
        if let Some((r, w)) = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| parse_schedstat(&s))
        {
            tot.0 += r;
            tot.1 += w;
        }
    }
    Some(tot)
}

/// Resident set size of `pid` in bytes (VmRSS of /proc/PID/status).
pub fn proc_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&s)
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_comm() {
        let line =
            "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_stat_cpu(line, 100), Some(Duration::from_secs(3)));
    }

    #[test]
    fn schedstat() {
        assert_eq!(
            parse_schedstat("48953759919 262415898275 47429\n"),
            Some((48953759919, 262415898275))
        );
        assert_eq!(parse_schedstat("garbage"), None);
        assert!(thread_schedstat().is_some());
        assert!(proc_schedstat(std::process::id()).is_some());
    }

    #[test]
    fn vmrss() {
        let st = "Name:\tmosquitto\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\n";
        assert_eq!(parse_vmrss(st), Some(5120 * 1024));
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(proc_cpu(me).is_some());
        assert!(proc_rss(me).unwrap() > 0);
        let _ = self_cpu();
    }
}
