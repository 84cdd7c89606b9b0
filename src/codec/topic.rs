//! Validated topic names and topic filters [MQTT-4.7].
//!
//! Owns: the `TopicName` and `TopicFilter` newtypes. A value of either type has passed the
//! spec's rules once, when it was built (normally by the decoder), so nothing downstream
//! re-validates strings. Both wrap a `ByteString`, which shares the read buffer.
//! Must not touch: matching against subscriptions (that is `routing`).

use std::fmt;

use bytestring::ByteString;
use thiserror::Error;

/// Longest topic an MQTT string can carry [MQTT-1.5.4].
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Why a topic name or filter was rejected; each names the clause it breaks.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    #[error("topic must be at least one character long [MQTT-4.7.3-1]")]
    Empty,
    #[error("topic is longer than 65535 bytes [MQTT-4.7.3-3]")]
    TooLong,
    #[error("topic must not contain the null character U+0000 [MQTT-4.7.3-2]")]
    NullCharacter,
    #[error("topic name must not contain wildcard characters [MQTT-3.3.2-2]")]
    WildcardInName,
    #[error("multi-level wildcard '#' must be the last character and stand alone in its level [MQTT-4.7.1-1]")]
    BadMultiLevelWildcard,
    #[error("single-level wildcard '+' must occupy an entire level [MQTT-4.7.1-2]")]
    BadSingleLevelWildcard,
    #[error(
        "shared subscription needs a non-empty share name without '/', '+' or '#' [MQTT-4.8.2-2]"
    )]
    BadShareName,
    #[error("shared subscription needs a topic filter after the share name [MQTT-4.8.2-1]")]
    EmptySharedFilter,
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// A topic name as used in PUBLISH: no wildcards, no NUL, 1..=65535 bytes.
///
/// The one exception is [`TopicName::alias_placeholder`], the empty topic of a v5 PUBLISH that
/// relies on a topic alias [MQTT-3.3.2-8]; sessions resolve it before routing.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(ByteString);

impl TopicName {
    pub fn new(s: impl Into<ByteString>) -> Result<Self, TopicError> {
        let s = s.into();
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        check_common(&s)?;
        if s.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(s))
    }

    /// A copy in its own allocation. Decoded names share the read buffer they came in; one
    /// that is kept for long (a will, a retained message) would otherwise pin that buffer.
    pub fn detached(&self) -> TopicName {
        TopicName(ByteString::from(&*self.0))
    }

    /// The empty topic of a v5 PUBLISH that carries a topic alias.
    pub fn alias_placeholder() -> Self {
        TopicName(ByteString::new())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytestring(&self) -> &ByteString {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Topics starting with `$` are not matched by filters starting with a wildcard
    /// [MQTT-4.7.2-1].
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }

    /// The topic's levels, split on `/`. Empty levels are real levels ("a//b" has three).
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicName({:?})", &*self.0)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A topic filter as used in SUBSCRIBE/UNSUBSCRIBE, possibly a shared subscription
/// `$share/{group}/{filter}` [MQTT-4.8.2].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter {
    raw: ByteString,
    /// Byte offset of the filter proper inside `raw` (0 unless shared).
    filter_start: u16,
    /// Length of the share name (0 unless shared; share names are never empty).
    group_len: u16,
}

const SHARE_PREFIX: &str = "$share/";

impl TopicFilter {
    pub fn new(s: impl Into<ByteString>) -> Result<Self, TopicError> {
        let raw = s.into();
        if raw.is_empty() {
            return Err(TopicError::Empty);
        }
        check_common(&raw)?;
        let (filter_start, group_len) = if let Some(rest) = raw.strip_prefix(SHARE_PREFIX) {
            let Some(slash) = rest.find('/') else {
                return Err(TopicError::EmptySharedFilter);
            };
            let group = &rest[..slash];
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::BadShareName);
            }
            if slash + 1 == rest.len() {
                return Err(TopicError::EmptySharedFilter);
            }
            // Lengths fit: raw is at most 65535 bytes.
            ((SHARE_PREFIX.len() + slash + 1) as u16, slash as u16)
        } else {
            (0, 0)
        };
        validate_filter(&raw[filter_start as usize..])?;
        Ok(TopicFilter {
            raw,
            filter_start,
            group_len,
        })
    }

    /// A copy in its own allocation (see [`TopicName::detached`]): subscriptions live as long
    /// as their session, and must not pin the read buffer of the SUBSCRIBE they came in.
    pub fn detached(&self) -> TopicFilter {
        TopicFilter {
            raw: ByteString::from(&*self.raw),
            ..*self
        }
    }

    /// The whole filter as sent by the client, `$share/...` prefix included.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn as_bytestring(&self) -> &ByteString {
        &self.raw
    }

    /// The filter proper, without any `$share/{group}/` prefix.
    pub fn filter(&self) -> &str {
        &self.raw[self.filter_start as usize..]
    }

    /// The share name of a shared subscription.
    pub fn share_group(&self) -> Option<&str> {
        if self.group_len == 0 {
            None
        } else {
            let start = SHARE_PREFIX.len();
            Some(&self.raw[start..start + self.group_len as usize])
        }
    }

    pub fn is_shared(&self) -> bool {
        self.group_len != 0
    }

    pub fn has_wildcards(&self) -> bool {
        self.filter().contains(['+', '#'])
    }

    /// The levels of the filter proper, split on `/`.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.filter().split('/')
    }

    /// Whether this filter (ignoring any share group) matches `topic`, per [MQTT-4.7].
    /// A direct, allocation-free matcher: the trie is the fast path, this is the reference.
    pub fn matches(&self, topic: &TopicName) -> bool {
        let filter = self.filter();
        if topic.is_system() && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let mut f = filter.split('/');
        let mut t = topic.levels();
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(fl), Some(tl)) if fl == tl => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

fn validate_filter(f: &str) -> Result<(), TopicError> {
    let mut levels = f.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') {
            if level != "#" || levels.peek().is_some() {
                return Err(TopicError::BadMultiLevelWildcard);
            }
        } else if level.contains('+') && level != "+" {
            return Err(TopicError::BadSingleLevelWildcard);
        }
    }
    Ok(())
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicFilter({:?})", &*self.raw)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TopicName {
        TopicName::new(s.to_string()).unwrap()
    }
    fn filter(s: &str) -> TopicFilter {
        TopicFilter::new(s.to_string()).unwrap()
    }

    #[test]
    fn names_reject_wildcards_nul_and_empty() {
        assert_eq!(TopicName::new("a/+/b"), Err(TopicError::WildcardInName));
        assert_eq!(TopicName::new("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(TopicName::new("a\0b"), Err(TopicError::NullCharacter));
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
        assert_eq!(TopicName::new("x".repeat(65_536)), Err(TopicError::TooLong));
        assert!(TopicName::new("x".repeat(65_535)).is_ok());
        // Spaces, empty levels and a lone slash are all valid names [MQTT-4.7.3].
        for ok in [
            "/",
            "a//b",
            "/finance",
            "sport/tennis player1",
            "$SYS/broker",
        ] {
            assert!(TopicName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn filter_wildcard_placement_follows_spec_examples() {
        // Valid examples from [MQTT-4.7.1.2] and [MQTT-4.7.1.3].
        for ok in [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/+",
        ] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            TopicFilter::new("sport/tennis#"),
            Err(TopicError::BadMultiLevelWildcard)
        );
        assert_eq!(
            TopicFilter::new("sport/tennis/#/ranking"),
            Err(TopicError::BadMultiLevelWildcard)
        );
        assert_eq!(
            TopicFilter::new("sport+"),
            Err(TopicError::BadSingleLevelWildcard)
        );
        assert_eq!(TopicFilter::new(""), Err(TopicError::Empty));
    }

    #[test]
    fn shared_subscriptions_parse_group_and_filter() {
        let f = filter("$share/consumer1/sport/tennis/+");
        assert_eq!(f.share_group(), Some("consumer1"));
        assert_eq!(f.filter(), "sport/tennis/+");
        assert!(f.is_shared());
        assert_eq!(TopicFilter::new("$share//a"), Err(TopicError::BadShareName));
        assert_eq!(
            TopicFilter::new("$share/g+/a"),
            Err(TopicError::BadShareName)
        );
        assert_eq!(
            TopicFilter::new("$share/group"),
            Err(TopicError::EmptySharedFilter)
        );
        assert_eq!(
            TopicFilter::new("$share/group/"),
            Err(TopicError::EmptySharedFilter)
        );
        // "$shared/x" is an ordinary filter, not a share.
        assert!(!filter("$sharedx/a").is_shared());
    }

    #[test]
    fn matching_follows_spec_examples() {
        let t = name("sport/tennis/player1");
        assert!(filter("sport/tennis/player1/#").matches(&t));
        assert!(filter("sport/tennis/player1/#").matches(&name("sport/tennis/player1/ranking")));
        assert!(filter("sport/#").matches(&name("sport")));
        assert!(filter("sport/tennis/+").matches(&t));
        assert!(!filter("sport/tennis/+").matches(&name("sport/tennis/player1/ranking")));
        assert!(!filter("sport/+").matches(&name("sport")));
        assert!(filter("sport/+").matches(&name("sport/")));
        assert!(filter("+/+").matches(&name("/finance")));
        assert!(filter("/+").matches(&name("/finance")));
        assert!(!filter("+").matches(&name("/finance")));
        assert!(filter("#").matches(&t));
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcards() {
        let sys = name("$SYS/monitor/Clients");
        assert!(!filter("#").matches(&sys));
        assert!(!filter("+/monitor/Clients").matches(&sys));
        assert!(filter("$SYS/#").matches(&sys));
        assert!(filter("$SYS/monitor/+").matches(&sys));
        assert!(filter("$share/g/$SYS/#").matches(&sys));
    }
}
