//! The loadgen's file-descriptor budget: one descriptor per connection, so RLIMIT_NOFILE
//! bounds how many devices one process can hold.
//!
//! Owns: reading and raising this process's RLIMIT_NOFILE soft limit (never above the hard
//! limit, which an unprivileged process cannot raise) and the arithmetic of how many devices
//! fit. Must not touch: sockets or scenario logic.

/// RLIMIT_NOFILE of this process (`u64::MAX` = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    pub soft: u64,
    pub hard: u64,
}

fn from_rlim(v: libc::rlim_t) -> u64 {
    if v == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        v
    }
}

pub fn get_nofile() -> NoFile {
    // SAFETY: zeroed rlimit is valid; getrlimit writes into it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return NoFile {
            soft: 1024,
            hard: 1024,
        };
    }
    NoFile {
        soft: from_rlim(rl.rlim_cur),
        hard: from_rlim(rl.rlim_max),
    }
}

/// The soft limit to ask for: `want` if the hard limit allows it, else the hard limit; never
/// lower than the current soft limit.
pub fn target_soft(want: u64, cur: NoFile) -> u64 {
    if cur.soft >= want {
        cur.soft
    } else {
        want.min(cur.hard)
    }
}

/// Raise the soft limit towards `want` descriptors (capped by the hard limit). Returns the
/// limits in effect afterwards; the caller compares `soft` with what it needs.
pub fn raise_nofile(want: u64) -> NoFile {
    let cur = get_nofile();
    let t = target_soft(want, cur);
    if t > cur.soft {
        let rl = libc::rlimit {
            rlim_cur: if t == u64::MAX {
                libc::RLIM_INFINITY
            } else {
                t
            },
            rlim_max: if cur.hard == u64::MAX {
                libc::RLIM_INFINITY
            } else {
                cur.hard
            },
        };
        // SAFETY: valid rlimit; lowering nothing, raising the soft limit within the hard one.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    }
    get_nofile()
}

/// Descriptors a fleet process needs besides one per device: stdio, each glommio executor's
/// rings and event fds, the backend and command connections, files opened while loading
/// certificates, and headroom.
pub fn reserve_fds(cores: usize, extra_conns: u64) -> u64 {
    64 + 16 * cores as u64 + extra_conns
}

/// Devices that fit under a soft limit of `limit` descriptors with `reserve` taken.
pub fn device_cap(limit: u64, reserve: u64) -> u64 {
    limit.saturating_sub(reserve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_capped_by_the_hard_limit_and_never_lowers() {
        let l = |soft, hard| NoFile { soft, hard };
        assert_eq!(target_soft(15_100, l(1024, 20_000)), 15_100);
        assert_eq!(target_soft(30_000, l(1024, 20_000)), 20_000);
        assert_eq!(target_soft(500, l(1024, 20_000)), 1024);
        assert_eq!(target_soft(1 << 40, l(1024, u64::MAX)), 1 << 40);
    }

    #[test]
    fn devices_fit_under_the_limit_minus_the_reserve() {
        let r = reserve_fds(2, 5);
        assert_eq!(r, 64 + 32 + 5);
        assert_eq!(device_cap(20_000, r), 20_000 - 101);
        assert_eq!(device_cap(50, r), 0);
    }

    #[test]
    fn raising_reaches_the_hard_limit_at_most() {
        let before = get_nofile();
        assert!(before.soft <= before.hard);
        let after = raise_nofile(before.soft.saturating_add(1));
        assert!(after.soft >= before.soft);
        assert!(after.soft <= after.hard);
        assert_eq!(after.hard, before.hard, "the hard limit is never touched");
        if before.hard > before.soft {
            assert!(after.soft > before.soft, "{before:?} → {after:?}");
        }
        // Asking for less than the current limit changes nothing.
        assert_eq!(raise_nofile(1), after);
    }
}
