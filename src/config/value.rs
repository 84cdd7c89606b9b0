//! Value parsers shared by the file reader and the command line. Each returns the operator
//! message (without location) on failure, e.g. `expected a number 0-65535, got 'abc'`.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::time::Duration;

/// `true` / `false`, as mosquitto (no `yes`/`1`: a typo must not read as a value).
pub(crate) fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("expected true or false, got '{v}'")),
    }
}

/// A decimal integer in `min..=max`.
pub(crate) fn parse_number(v: &str, min: u64, max: u64) -> Result<u64, String> {
    let err = || format!("expected a number {min}-{max}, got '{v}'");
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = v.parse().map_err(|_| err())?;
    if n < min || n > max {
        return Err(err());
    }
    Ok(n)
}

/// mosquitto's duration syntax for `persistent_client_expiration`: an integer followed by one
/// of `s` (seconds), `h` (hours), `d` (days), `w` (weeks), `m` (months of 30 days — not
/// minutes) or `y` (years of 365 days). The value must be positive.
pub fn parse_mosquitto_duration(v: &str) -> Result<Duration, String> {
    let err = |why: &str| {
        format!("expected a duration like 2h, 14d, 1w, 1m (month) or 1y ({why}), got '{v}'")
    };
    let Some(unit) = v.chars().last() else {
        return Err(err("empty"));
    };
    let mult: u64 = match unit {
        's' => 1,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        'm' => 30 * 86_400,
        'y' => 365 * 86_400,
        c if c.is_ascii_digit() => return Err(err("missing unit s/h/d/w/m/y")),
        _ => return Err(err("unknown unit")),
    };
    let digits = &v[..v.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(err("not a whole number"));
    }
    let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
    if n == 0 {
        return Err(err("must be positive"));
    }
    let secs = n.checked_mul(mult).ok_or_else(|| err("number too large"))?;
    Ok(Duration::from_secs(secs))
}

/// Render a duration back in the syntax above, using the largest unit that divides it
/// exactly (months are written as days to avoid the `m` = month surprise).
pub(crate) fn format_mosquitto_duration(d: Duration) -> String {
    let s = d.as_secs();
    for (unit, mult) in [
        ('y', 365 * 86_400),
        ('w', 7 * 86_400),
        ('d', 86_400),
        ('h', 3600),
    ] {
        if s > 0 && s % mult == 0 {
            return format!("{}{}", s / mult, unit);
        }
    }
    format!("{s}s")
}

/// Seconds, written either as a bare number or with a unit `s`/`m` (minutes here: these are
/// Midge keys, e.g. `tls_handshake_timeout 10` or `30s`).
pub(crate) fn parse_seconds(v: &str, min: u64, max: u64) -> Result<Duration, String> {
    let err = || format!("expected a number of seconds {min}-{max} (e.g. 10 or 10s), got '{v}'");
    let (digits, mult) = if let Some(d) = v.strip_suffix('s') {
        (d, 1)
    } else if let Some(d) = v.strip_suffix('m') {
        (d, 60)
    } else {
        (v, 1)
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let secs = n.checked_mul(mult).ok_or_else(err)?;
    if secs < min || secs > max {
        return Err(err());
    }
    Ok(Duration::from_secs(secs))
}

/// A bind address: an IP literal, `localhost`, or a host name resolved once at startup (like
/// mosquitto). Bracketed IPv6 (`[::1]`) is accepted.
pub(crate) fn parse_host(v: &str) -> Result<IpAddr, String> {
    let bare = v
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(v);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip);
    }
    if bare.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    if bare.starts_with('/') {
        return Err(format!(
            "'{v}' looks like a unix socket path; unix socket listeners are not supported by Midge"
        ));
    }
    match (bare, 0u16).to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| format!("host name '{v}' resolved to no address")),
        Err(e) => Err(format!(
            "expected an IP address or resolvable host name, got '{v}' ({e})"
        )),
    }
}

/// A TCP port 1-65535.
pub(crate) fn parse_port(v: &str) -> Result<u16, String> {
    if v == "0" {
        return Err(
            "port 0 is mosquitto's unix-socket listener, which Midge does not support; \
             expected a port 1-65535"
                .to_string(),
        );
    }
    parse_number(v, 1, 65535)
        .map(|n| n as u16)
        .map_err(|_| format!("expected a port 1-65535, got '{v}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_mosquitto_units() {
        let day = 86_400;
        assert_eq!(
            parse_mosquitto_duration("2h"),
            Ok(Duration::from_secs(7200))
        );
        assert_eq!(
            parse_mosquitto_duration("14d"),
            Ok(Duration::from_secs(14 * day))
        );
        assert_eq!(
            parse_mosquitto_duration("1w"),
            Ok(Duration::from_secs(7 * day))
        );
        // `m` is a month (30 days) in mosquitto, not a minute.
        assert_eq!(
            parse_mosquitto_duration("1m"),
            Ok(Duration::from_secs(30 * day))
        );
        assert_eq!(
            parse_mosquitto_duration("1y"),
            Ok(Duration::from_secs(365 * day))
        );
        assert_eq!(parse_mosquitto_duration("90s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn bad_durations_are_rejected_with_reason() {
        for bad in [
            "",
            "10",
            "d",
            "0d",
            "-1d",
            "1.5d",
            "3x",
            "1 d",
            "99999999999999999999y",
        ] {
            let e = parse_mosquitto_duration(bad).unwrap_err();
            assert!(e.contains(&format!("got '{bad}'")), "{bad}: {e}");
        }
        assert!(parse_mosquitto_duration("10")
            .unwrap_err()
            .contains("missing unit"));
        // Overflow of the multiplication, not of the number itself.
        assert!(parse_mosquitto_duration(&format!("{}y", u64::MAX / 1000)).is_err());
    }

    #[test]
    fn durations_render_round_trip() {
        for s in ["2h", "14d", "1w", "1y", "90s", "3d"] {
            let d = parse_mosquitto_duration(s).unwrap();
            assert_eq!(
                parse_mosquitto_duration(&format_mosquitto_duration(d)),
                Ok(d)
            );
        }
        assert_eq!(
            format_mosquitto_duration(Duration::from_secs(30 * 86_400)),
            "30d"
        );
        assert_eq!(
            format_mosquitto_duration(Duration::from_secs(14 * 86_400)),
            "2w"
        );
    }

    #[test]
    fn numbers_are_strict() {
        assert_eq!(parse_number("20", 0, 65535), Ok(20));
        assert_eq!(
            parse_number("abc", 0, 65535),
            Err("expected a number 0-65535, got 'abc'".to_string())
        );
        for bad in ["", "-1", "20abc", "+5", "65536", " 1", "1e3"] {
            assert!(parse_number(bad, 0, 65535).is_err(), "{bad}");
        }
    }

    #[test]
    fn booleans_are_true_or_false_only() {
        assert_eq!(parse_bool("true"), Ok(true));
        assert_eq!(parse_bool("false"), Ok(false));
        for bad in ["yes", "1", "True", "on", ""] {
            assert!(parse_bool(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_and_ports() {
        assert_eq!(parse_host("127.0.0.1"), Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(parse_host("localhost"), Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(parse_host("[::1]"), Ok("::1".parse().unwrap()));
        assert!(parse_host("/run/mqtt.sock")
            .unwrap_err()
            .contains("unix socket"));
        assert_eq!(parse_port("8883"), Ok(8883));
        assert!(parse_port("0").unwrap_err().contains("unix-socket"));
        assert!(parse_port("65536").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("10", 1, 300), Ok(Duration::from_secs(10)));
        assert_eq!(parse_seconds("30s", 1, 300), Ok(Duration::from_secs(30)));
        assert_eq!(parse_seconds("2m", 1, 300), Ok(Duration::from_secs(120)));
        assert!(parse_seconds("0", 1, 300).is_err());
        assert!(parse_seconds("6m", 1, 300).is_err());
        assert!(parse_seconds("ten", 1, 300).is_err());
    }
}
