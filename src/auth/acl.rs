//! mosquitto's `acl_file`: its grammar, its matching rules, compiled for a cheap per-message
//! check.
//!
//! Owns: parsing an ACL file into per-user rule tries and a pattern trie, and answering "may
//! this client read/write this topic". Must not touch: which listener uses which file
//! (config), when checks happen (the connection path and the shard core), reloading
//! ([`super::reload`]).
//!
//! # Grammar (mosquitto 2.0.11 src/security_default.c `aclfile__parse`)
//!
//! * Trailing whitespace is trimmed. A line whose first character is `#` is a comment; blank
//!   lines are skipped. Words are separated by spaces.
//! * `topic [read|write|readwrite|deny] TOPIC` — a rule for the current section. Without the
//!   access word it is `readwrite` (so `topic read` alone is readwrite on the topic `read`,
//!   as in mosquitto). TOPIC is the rest of the line and may contain spaces and `+`/`#`
//!   wildcards, which must be whole levels (`#` last).
//! * `user NAME` — the following `topic` lines apply to clients with that username (the rest
//!   of the line, trimmed: names may contain spaces). The same user may appear again; its rules
//!   add up. `topic` lines before the first `user` line form the *anonymous section*: they
//!   apply to clients without a username, and to nobody else.
//! * `pattern [read|write|readwrite|deny] TOPIC` — a rule for every client, wherever the line
//!   is. A level `%u` matches the client's username, `%c` its client id; a pattern with `%u`
//!   never applies to a client without a username. A pattern without either is accepted with a
//!   warning (mosquitto warns too).
//! * Anything else is an error naming the line.
//!
//! # Matching (mosquitto 2.0.11 `mosquitto_acl_check_default`)
//!
//! 1. The client's own section (its user's rules, or the anonymous section): if any `deny` rule
//!    matches → denied; else if a rule granting the access matches → allowed.
//! 2. Otherwise, if any pattern exists and the username or client id contains `+` or `#` →
//!    denied (they could widen a `%u`/`%c` level).
//! 3. The patterns, the same way: a matching `deny` → denied; a matching grant → allowed.
//! 4. Nothing matched → denied. An empty ACL file denies everything.
//!
//! A rule matches a topic as a subscription filter would (`a/#` matches `a`; `+` matches one
//! level, also an empty one), except that a topic starting with `$` is matched only by rules
//! whose first level starts with `$` (`#` does not grant `$SYS/…`).
//!
//! SUBSCRIBE and UNSUBSCRIBE are not governed by ACL lines: mosquitto 2.0's acl_file grants
//! every subscription (its code says "FIXME - implement ACL subscription strings") and checks
//! `read` when each message is delivered, so `#` by a device limited to `devices/%u/#`
//! delivers exactly that device's messages.
//!
//! # Where Midge differs, on purpose
//!
//! * `%u` and `%c` are whole levels, compared as strings, never substituted as text: a
//!   username `a/b` never matches the level `%u` (mosquitto would build `devices/a/b/#` and
//!   give the user `a/b` a corner of user `a`'s tree). Text around them inside one level
//!   (`pattern read x/id-%c`) is matched literally around the name, as mosquitto would.
//! * For a `$` topic, a first level `%u`/`%c` does not match (a username starting with `$`
//!   cannot reach `$SYS`).
//! * A tab between the words of a line is an error (mosquitto splits on spaces only and would
//!   read `topic read<TAB>x` as readwrite on the topic `read<TAB>x`). The file must be UTF-8.
//!
//! # Cost
//!
//! Rules are compiled into tries whose levels are pre-split (literal children in a hash map,
//! `+`, `#`, `%u`, `%c` as their own edges), one trie per user, found by one hash lookup. A
//! check walks only the branches the topic can take, compares `%u`/`%c` levels with the names
//! in place and allocates nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::hash::BuildHasherDefault;

use smallvec::SmallVec;

use super::text::{self, is_c_space, quoted, trim_blanks};
use super::{Access, Action, AuthFileError, Authorizer, Client, Decision, DenyReason, FileWarning};

/// mosquitto's `TOPIC_HIERARCHY_LIMIT`: at most this many `/` in an ACL topic.
pub const MAX_TOPIC_LEVELS_SEPARATORS: usize = 200;
/// Longest ACL topic (MQTT's string limit).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Perm {
    deny: bool,
    /// [`Access::bit`]s granted.
    allow: u8,
}

impl std::ops::BitOrAssign for Perm {
    fn bitor_assign(&mut self, o: Perm) {
        self.deny |= o.deny;
        self.allow |= o.allow;
    }
}

/// One piece of a level that mixes text with `%u`/`%c` (e.g. `id-%c`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Box<str>),
    User,
    Client,
}

/// The hash every level is compared by before its bytes (stored literals, topic levels,
/// names): FNV-1a. Not for hash maps facing peers: a collision only costs a byte comparison,
/// never a wrong answer.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[inline]
fn level_hash(s: &str) -> u64 {
    s.bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// A topic split into levels, each with its [`level_hash`], once per message: the publisher's
/// write check and every subscriber's read check of that message can share it.
#[derive(Debug, Clone)]
pub struct TopicLevels<'a> {
    topic: &'a str,
    levels: SmallVec<[(&'a str, u64); 8]>,
    dollar: bool,
}

impl<'a> TopicLevels<'a> {
    pub fn new(topic: &'a str) -> TopicLevels<'a> {
        // One pass over the bytes: split and hash together.
        let mut levels = SmallVec::new();
        let mut start = 0;
        let mut h = FNV_OFFSET;
        for (i, &b) in topic.as_bytes().iter().enumerate() {
            if b == b'/' {
                levels.push((&topic[start..i], h));
                start = i + 1;
                h = FNV_OFFSET;
            } else {
                h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
            }
        }
        levels.push((&topic[start..], h));
        TopicLevels {
            topic,
            levels,
            dollar: topic.starts_with('$'),
        }
    }

    pub fn topic(&self) -> &'a str {
        self.topic
    }
}

/// A name compared with `%u` / `%c` levels, with its hash.
#[derive(Debug, Clone)]
struct Name {
    text: Box<str>,
    hash: u64,
}

impl Name {
    fn new(s: &str) -> Name {
        Name {
            text: s.into(),
            hash: level_hash(s),
        }
    }

    #[inline]
    fn is(&self, level: &str, hash: u64) -> bool {
        self.hash == hash && *self.text == *level
    }
}

/// What the ACL needs to know about a client, worked out once per connection (and again when
/// the ACL is reloaded): its section, whether its names contain wildcards, the names' hashes.
/// Owns copies of the names, so it cannot be used with another client's.
#[derive(Debug, Clone)]
pub struct AclSubject {
    username: Option<Name>,
    client_id: Name,
    /// Generation of the file `section` indexes into.
    generation: u64,
    section: Option<u32>,
    wildcard_name: bool,
}

impl AclSubject {
    /// A subject not resolved against any ACL (checks resolve it on the fly).
    pub fn unresolved(client: Client<'_>) -> AclSubject {
        AclSubject {
            username: client.username.map(Name::new),
            client_id: Name::new(client.client_id),
            generation: 0,
            section: None,
            wildcard_name: client.username.is_some_and(has_wildcard)
                || has_wildcard(client.client_id),
        }
    }

    /// The ACL version this subject was resolved against (0: none). After
    /// [`super::AccessView::refresh`], remake subjects whose generation differs.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn client(&self) -> Client<'_> {
        Client {
            client_id: &self.client_id.text,
            username: self.username.as_ref().map(|n| &*n.text),
        }
    }
}

fn has_wildcard(s: &str) -> bool {
    s.bytes().any(|b| b == b'+' || b == b'#')
}

/// Literal children of a node: a short list scanned in place (most nodes have a handful of
/// children), a map from level hash beyond [`Literals::SMALL`].
#[derive(Debug)]
enum Literals {
    Small(Vec<(u64, Box<str>, u32)>),
    Map(HashMap<u64, Bucket, BuildHasherDefault<PreHashed>>),
}

/// The literals of one level hash (more than one only on a hash collision).
type Bucket = SmallVec<[(Box<str>, u32); 1]>;

/// The hasher of a map whose keys are already [`level_hash`]es.
#[derive(Default)]
struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Default for Literals {
    fn default() -> Self {
        Literals::Small(Vec::new())
    }
}

impl Literals {
    const SMALL: usize = 8;

    #[inline]
    fn get(&self, level: &str, hash: u64) -> Option<u32> {
        match self {
            Literals::Small(v) => v
                .iter()
                .find(|(h, k, _)| *h == hash && **k == *level)
                .map(|&(_, _, c)| c),
            Literals::Map(m) => m
                .get(&hash)?
                .iter()
                .find(|(k, _)| **k == *level)
                .map(|&(_, c)| c),
        }
    }

    fn insert(&mut self, level: &str, child: u32) {
        let hash = level_hash(level);
        match self {
            Literals::Small(v) if v.len() < Self::SMALL => v.push((hash, level.into(), child)),
            Literals::Small(v) => {
                let mut m: HashMap<u64, Bucket, _> = HashMap::default();
                for (h, k, c) in v.drain(..) {
                    m.entry(h).or_default().push((k, c));
                }
                m.entry(hash).or_default().push((level.into(), child));
                *self = Literals::Map(m);
            }
            Literals::Map(m) => m.entry(hash).or_default().push((level.into(), child)),
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    literal: Literals,
    plus: Option<u32>,
    user: Option<u32>,
    client: Option<u32>,
    mixed: Vec<(Box<[Part]>, u32)>,
    /// Rules whose filter ends at this node.
    end: Perm,
    /// Rules `<this node>/#`: match this node's topic and everything below.
    hash: Perm,
}

/// A set of rules compiled into a trie of levels. Node 0 is the root.
#[derive(Debug)]
struct Trie {
    nodes: Vec<Node>,
}

enum Level<'a> {
    Literal(&'a str),
    Plus,
    Hash,
    User,
    Client,
    Mixed(Vec<Part>),
}

fn classify(level: &str, pattern: bool) -> Level<'_> {
    match level {
        "+" => Level::Plus,
        "#" => Level::Hash,
        "%u" if pattern => Level::User,
        "%c" if pattern => Level::Client,
        _ if pattern && (level.contains("%u") || level.contains("%c")) => {
            let mut parts = Vec::new();
            let mut text = String::new();
            let mut rest = level;
            while let Some(i) = rest.find('%') {
                text.push_str(&rest[..i]);
                let after = &rest[i..];
                let sub = if after.starts_with("%u") {
                    Some(Part::User)
                } else if after.starts_with("%c") {
                    Some(Part::Client)
                } else {
                    None
                };
                match sub {
                    Some(p) => {
                        if !text.is_empty() {
                            parts.push(Part::Text(std::mem::take(&mut text).into()));
                        }
                        parts.push(p);
                        rest = &after[2..];
                    }
                    None => {
                        text.push('%');
                        rest = &after[1..];
                    }
                }
            }
            text.push_str(rest);
            if !text.is_empty() {
                parts.push(Part::Text(text.into()));
            }
            Level::Mixed(parts)
        }
        _ => Level::Literal(level),
    }
}

fn mixed_matches(parts: &[Part], level: &str, s: &AclSubject) -> bool {
    let mut rest = level;
    for p in parts {
        let want = match p {
            Part::Text(t) => t,
            Part::User => match &s.username {
                Some(u) => &u.text,
                None => return false,
            },
            Part::Client => &s.client_id.text,
        };
        match rest.strip_prefix(&**want) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

impl Trie {
    fn new() -> Trie {
        Trie {
            nodes: vec![Node::default()],
        }
    }

    fn child(&mut self, at: u32, level: Level<'_>) -> u32 {
        let next = self.nodes.len() as u32;
        let node = &mut self.nodes[at as usize];
        let slot = match level {
            Level::Literal(l) => {
                if let Some(c) = node.literal.get(l, level_hash(l)) {
                    return c;
                }
                node.literal.insert(l, next);
                None
            }
            Level::Plus => Some(&mut node.plus),
            Level::User => Some(&mut node.user),
            Level::Client => Some(&mut node.client),
            Level::Mixed(parts) => {
                if let Some((_, c)) = node.mixed.iter().find(|(p, _)| **p == *parts) {
                    return *c;
                }
                node.mixed.push((parts.into(), next));
                None
            }
            Level::Hash => unreachable!("`#` is handled by insert"),
        };
        if let Some(slot) = slot {
            if let Some(c) = *slot {
                return c;
            }
            *slot = Some(next);
        }
        self.nodes.push(Node::default());
        next
    }

    fn insert(&mut self, filter: &str, pattern: bool, perm: Perm) {
        let mut at = 0u32;
        for level in filter.split('/') {
            match classify(level, pattern) {
                Level::Hash => {
                    // Validated: `#` is the last level.
                    self.nodes[at as usize].hash |= perm;
                    return;
                }
                l => at = self.child(at, l),
            }
        }
        self.nodes[at as usize].end |= perm;
    }

    /// Everything the rules say about the topic: a depth-first walk over the branches the
    /// topic can take, with an explicit stack (no recursion, no allocation for ≤ 16 pending
    /// branches).
    fn lookup(&self, t: &TopicLevels<'_>, s: &AclSubject) -> Perm {
        let mut acc = Perm::default();
        let n = t.levels.len() as u32;
        let mut stack: SmallVec<[(u32, u32); 16]> = SmallVec::new();
        stack.push((0, 0));
        while let Some((at, i)) = stack.pop() {
            let node = &self.nodes[at as usize];
            // A topic starting with `$` is matched only by rules whose first level starts
            // with `$`: no wildcard or name edge at the root.
            let wild = !(i == 0 && t.dollar);
            if wild {
                acc |= node.hash;
            }
            if i == n {
                acc |= node.end;
                continue;
            }
            if acc.deny {
                break; // a deny anywhere in this set decides it
            }
            let (level, h) = t.levels[i as usize];
            if let Some(c) = node.literal.get(level, h) {
                stack.push((c, i + 1));
            }
            if wild {
                if let Some(c) = node.plus {
                    stack.push((c, i + 1));
                }
                if let (Some(c), Some(u)) = (node.user, &s.username) {
                    if u.is(level, h) {
                        stack.push((c, i + 1));
                    }
                }
                if let Some(c) = node.client {
                    if s.client_id.is(level, h) {
                        stack.push((c, i + 1));
                    }
                }
            }
            for (parts, c) in &node.mixed {
                let literal_dollar =
                    matches!(parts.first(), Some(Part::Text(t)) if t.starts_with('$'));
                if (wild || literal_dollar) && mixed_matches(parts, level, s) {
                    stack.push((*c, i + 1));
                }
            }
        }
        acc
    }

    /// Does one rule granting `bit` match every topic the filter `f` matches? (`dollar`: the
    /// filter's first level is a literal starting with `$`, so are its topics' first levels:
    /// the root's wildcard and name edges do not apply, as in [`Trie::lookup`]. A filter
    /// whose first level is `+` or `#` matches no `$` topic [MQTT-4.7.2-1].) Sound, not
    /// complete: `false` only means "check each message".
    fn covers(&self, at: u32, f: &[&str], i: usize, s: &AclSubject, bit: u8, dollar: bool) -> bool {
        let node = &self.nodes[at as usize];
        let wild = !(i == 0 && dollar);
        // `x/#` grants `x` and everything below it: whatever the filter's rest is.
        if wild && node.hash.allow & bit != 0 {
            return true;
        }
        if i == f.len() {
            return node.end.allow & bit != 0;
        }
        let next = |c: u32| self.covers(c, f, i + 1, s, bit, dollar);
        match f[i] {
            // Only a `#` rule at this very node covers a `#` level (checked above).
            "#" => false,
            // Infinitely many levels: only a `+` rule covers them all.
            "+" => wild && node.plus.is_some_and(next),
            level => {
                let h = level_hash(level);
                node.literal.get(level, h).is_some_and(next)
                    || (wild && node.plus.is_some_and(next))
                    || (wild
                        && s.username.as_ref().is_some_and(|u| u.is(level, h))
                        && node.user.is_some_and(next))
                    || (wild && s.client_id.is(level, h) && node.client.is_some_and(next))
                    || node.mixed.iter().any(|(parts, c)| {
                        let literal_dollar =
                            matches!(parts.first(), Some(Part::Text(t)) if t.starts_with('$'));
                        (wild || literal_dollar) && mixed_matches(parts, level, s) && next(*c)
                    })
            }
        }
    }

    /// Could a `deny` rule match some topic the filter `f` matches? Sound, not complete:
    /// `true` may be a false alarm (then each message is checked), `false` never is.
    fn may_deny(&self, at: u32, f: &[&str], i: usize, s: &AclSubject, dollar: bool) -> bool {
        let node = &self.nodes[at as usize];
        let wild = !(i == 0 && dollar);
        if wild && node.hash.deny {
            return true;
        }
        if i == f.len() {
            return node.end.deny;
        }
        let next = |c: u32| self.may_deny(c, f, i + 1, s, dollar);
        match f[i] {
            // The filter's `#` reaches this node's topic (checked above) and everything below.
            "#" => self.any_deny_below(at, i == 0),
            "+" => {
                // `+` first matches no `$` level; below the root, any level.
                let literals = match &node.literal {
                    Literals::Small(v) => v
                        .iter()
                        .filter(|(_, k, _)| !(i == 0 && k.starts_with('$')))
                        .any(|&(_, _, c)| next(c)),
                    Literals::Map(m) => m
                        .values()
                        .flatten()
                        .filter(|(k, _)| !(i == 0 && k.starts_with('$')))
                        .any(|&(_, c)| next(c)),
                };
                literals
                    || [node.plus, node.user, node.client]
                        .into_iter()
                        .flatten()
                        .any(next)
                    || node.mixed.iter().any(|(_, c)| next(*c))
            }
            level => {
                let h = level_hash(level);
                node.literal.get(level, h).is_some_and(next)
                    || (wild && node.plus.is_some_and(next))
                    || (wild
                        && s.username.as_ref().is_some_and(|u| u.is(level, h))
                        && node.user.is_some_and(next))
                    || (wild && s.client_id.is(level, h) && node.client.is_some_and(next))
                    || node.mixed.iter().any(|(parts, c)| {
                        let literal_dollar =
                            matches!(parts.first(), Some(Part::Text(t)) if t.starts_with('$'));
                        (wild || literal_dollar) && mixed_matches(parts, level, s) && next(*c)
                    })
            }
        }
    }

    /// Any `deny` rule in the subtree below `at` (`root`: skip first levels starting with
    /// `$`, which a wildcard first level never reaches).
    fn any_deny_below(&self, at: u32, root: bool) -> bool {
        let node = &self.nodes[at as usize];
        if node.end.deny || node.hash.deny {
            return true;
        }
        let literals: Vec<(&str, u32)> = match &node.literal {
            Literals::Small(v) => v.iter().map(|(_, k, c)| (&**k, *c)).collect(),
            Literals::Map(m) => m.values().flatten().map(|(k, c)| (&**k, *c)).collect(),
        };
        literals
            .into_iter()
            .filter(|(k, _)| !(root && k.starts_with('$')))
            .any(|(_, c)| self.any_deny_below(c, false))
            || [node.plus, node.user, node.client]
                .into_iter()
                .flatten()
                .any(|c| self.any_deny_below(c, false))
            || node
                .mixed
                .iter()
                .any(|(_, c)| self.any_deny_below(*c, false))
    }

    fn is_empty(&self) -> bool {
        let r = &self.nodes[0];
        self.nodes.len() == 1 && r.end == Perm::default() && r.hash == Perm::default()
    }
}

/// A parsed and compiled ACL file.
#[derive(Debug)]
pub struct AclFile {
    path: PathBuf,
    generation: u64,
    /// Every section's rules: the anonymous section (if any) and one per user.
    sections: Vec<Trie>,
    anonymous_section: Option<u32>,
    user_index: HashMap<Box<str>, u32, ahash::RandomState>,
    /// True if the file has any `pattern` line (enables the `+`/`#` name rule).
    has_patterns: bool,
    /// Every pattern (for clients with a username).
    patterns: Trie,
    /// Patterns without `%u` (for clients without one: mosquitto skips `%u` patterns for them).
    patterns_anonymous: Trie,
    rules: usize,
    warnings: Vec<FileWarning>,
}

/// mosquitto_sub_topic_check, with the reason.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.len() > MAX_TOPIC_LEN {
        return Err(format!("topic longer than {MAX_TOPIC_LEN} bytes"));
    }
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.len() - 1 > MAX_TOPIC_LEVELS_SEPARATORS {
        return Err(format!(
            "topic has more than {} levels",
            MAX_TOPIC_LEVELS_SEPARATORS + 1
        ));
    }
    for (i, l) in levels.iter().enumerate() {
        if l.contains('+') && *l != "+" {
            return Err(format!(
                "invalid topic {}: '+' must be a whole level",
                quoted(topic)
            ));
        }
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "invalid topic {}: '#' must be the whole last level",
                quoted(topic)
            ));
        }
    }
    Ok(())
}

fn access_word(w: &str) -> Option<Perm> {
    Some(match w {
        "read" => Perm {
            deny: false,
            allow: Access::Read.bit(),
        },
        "write" => Perm {
            deny: false,
            allow: Access::Write.bit(),
        },
        "readwrite" => Perm {
            deny: false,
            allow: Access::Read.bit() | Access::Write.bit(),
        },
        "deny" => Perm {
            deny: true,
            allow: 0,
        },
        _ => return None,
    })
}

/// Split at the first space (C `strtok` with " "): leading spaces skipped, `(word, rest)`
/// with `rest` starting right after the space that ended the word.
fn word(s: &str) -> Option<(&str, Option<&str>)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    Some(match s.find(' ') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    })
}

fn no_tab(w: &str, what: &str) -> Result<(), String> {
    if w.contains('\t') {
        return Err(format!(
            "a tab in {what} {}: separate the words of an ACL line with spaces (mosquitto splits on \
             spaces only and would not read this line as intended)",
            quoted(w)
        ));
    }
    Ok(())
}

impl AclFile {
    /// Read and parse `path`. Blocking file I/O.
    pub fn load(path: &Path) -> Result<AclFile, AuthFileError> {
        let bytes = text::read(path, "ACL file")?;
        Self::parse(path, &bytes)
    }

    /// Parse the contents of an ACL file; `path` is for messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<AclFile, AuthFileError> {
        let mut acl = AclFile {
            path: path.to_path_buf(),
            generation: super::reload::next_generation(),
            sections: Vec::new(),
            anonymous_section: None,
            user_index: HashMap::with_hasher(ahash::RandomState::new()),
            has_patterns: false,
            patterns: Trie::new(),
            patterns_anonymous: Trie::new(),
            rules: 0,
            warnings: Vec::new(),
        };
        // The section `topic` lines go to: None = anonymous, Some(i) = sections[i].
        let mut section: Option<u32> = None;
        for line in text::lines(path, bytes) {
            let (n, raw) = line?;
            acl.parse_line(raw, &mut section)
                .map_err(|m| AuthFileError::line(path, n, m))?
                .into_iter()
                .for_each(|message| {
                    acl.warnings.push(FileWarning {
                        path: path.to_path_buf(),
                        line: n,
                        message,
                    })
                });
        }
        Ok(acl)
    }

    /// One line; returns warnings.
    fn parse_line(&mut self, raw: &str, section: &mut Option<u32>) -> Result<Vec<String>, String> {
        let line = raw.trim_end_matches(is_c_space);
        if line.starts_with('#') {
            return Ok(Vec::new());
        }
        let Some((kw, rest)) = word(line) else {
            return Ok(Vec::new());
        };
        let mut warnings = Vec::new();
        match kw {
            "topic" | "pattern" => {
                let pattern = kw == "pattern";
                let Some((first, after)) = rest.and_then(word) else {
                    return Err(format!("'{kw}' without a topic"));
                };
                no_tab(first, "the access word or topic")?;
                let (perm, topic) = match after {
                    Some(t) => {
                        let perm = access_word(first).ok_or_else(|| {
                            format!(
                                "invalid access type {} (expected read, write, readwrite or deny)",
                                quoted(first)
                            )
                        })?;
                        (perm, trim_blanks(t))
                    }
                    None => (access_word("readwrite").expect("known word"), first),
                };
                if after.is_none() && access_word(first).is_some() {
                    warnings.push(format!(
                        "'{kw} {first}' has no topic: as in mosquitto it grants readwrite on the \
                         topic {}",
                        quoted(first)
                    ));
                }
                check_topic(topic)?;
                self.rules += 1;
                if pattern {
                    self.has_patterns = true;
                    let has_u = topic.contains("%u");
                    if !has_u && !topic.contains("%c") {
                        warnings.push(format!(
                            "pattern {} contains neither %u nor %c (mosquitto warns too)",
                            quoted(topic)
                        ));
                    }
                    self.patterns.insert(topic, true, perm);
                    if !has_u {
                        self.patterns_anonymous.insert(topic, true, perm);
                    }
                } else {
                    if topic.contains("%u") || topic.contains("%c") {
                        warnings.push(format!(
                            "topic {} contains %u or %c, which only 'pattern' lines substitute; \
                             here they are literal text",
                            quoted(topic)
                        ));
                    }
                    let i = match *section {
                        Some(i) => i,
                        None => match self.anonymous_section {
                            Some(i) => i,
                            None => {
                                let i = self.sections.len() as u32;
                                self.sections.push(Trie::new());
                                self.anonymous_section = Some(i);
                                i
                            }
                        },
                    };
                    self.sections[i as usize].insert(topic, false, perm);
                }
            }
            "user" => {
                let name = rest.map(trim_blanks).unwrap_or("");
                if name.is_empty() {
                    return Err("'user' without a username".into());
                }
                let i = match self.user_index.get(name) {
                    Some(&i) => i,
                    None => {
                        let i = self.sections.len() as u32;
                        self.sections.push(Trie::new());
                        self.user_index.insert(name.into(), i);
                        i
                    }
                };
                *section = Some(i);
            }
            other => {
                no_tab(other, "the keyword")?;
                return Err(format!(
                    "invalid line: expected 'topic', 'pattern', 'user' or a '#' comment, got {}",
                    quoted(other)
                ));
            }
        }
        Ok(warnings)
    }

    /// Work out what the checks of `client` need (once per connection and ACL version).
    pub fn subject(&self, client: Client<'_>) -> AclSubject {
        AclSubject {
            generation: self.generation,
            section: self.section_of(client.username),
            ..AclSubject::unresolved(client)
        }
    }

    fn section_of(&self, username: Option<&str>) -> Option<u32> {
        match username {
            Some(u) => self.user_index.get(u).copied(),
            None => self.anonymous_section,
        }
    }

    fn trie(&self, section: u32) -> &Trie {
        &self.sections[section as usize]
    }

    /// May the subject have `access` to the topic? The whole of mosquitto's acl_file check.
    /// A subject made for another version of the file is re-resolved (correct, slower).
    pub fn check_subject(
        &self,
        subject: &AclSubject,
        access: Access,
        topic: &TopicLevels<'_>,
    ) -> Decision {
        // A section index is only meaningful in the version it was resolved against.
        let section = if subject.generation == self.generation {
            subject.section
        } else {
            self.section_of(subject.username.as_ref().map(|n| &*n.text))
        };
        if let Some(i) = section {
            let p = self.trie(i).lookup(topic, subject);
            if p.deny {
                return Decision::Deny(DenyReason::DenyRule);
            }
            if p.allow & access.bit() != 0 {
                return Decision::Allow;
            }
        }
        if !self.has_patterns {
            return Decision::Deny(DenyReason::NoMatch);
        }
        if subject.wildcard_name {
            return Decision::Deny(DenyReason::WildcardInName);
        }
        let trie = if subject.username.is_some() {
            &self.patterns
        } else {
            &self.patterns_anonymous
        };
        let p = trie.lookup(topic, subject);
        if p.deny {
            Decision::Deny(DenyReason::DenyRule)
        } else if p.allow & access.bit() != 0 {
            Decision::Allow
        } else {
            Decision::Deny(DenyReason::NoMatch)
        }
    }

    /// Does the subject have `access` to every topic the subscription filter `filter` (the
    /// topic part, without `$share/group/`) can match? Then deliveries through that
    /// subscription need no per-message check (until the file is reloaded: ask again).
    ///
    /// Sound, not complete: `true` means every matching topic passes
    /// [`AclFile::check_subject`]; `false` only means "check each message". It is `true` when
    /// no `deny` rule of the subject's section can match a topic of the filter and one rule
    /// of the section covers the whole filter, or else (patterns in use, no wildcard in the
    /// names) the same holds for the patterns. E.g. `pattern readwrite devices/%u/#` covers
    /// `devices/dev1/#` and `devices/dev1/cmd` for user `dev1`, not `devices/+/cmd` or `#`.
    pub fn grants_all(&self, subject: &AclSubject, access: Access, filter: &str) -> bool {
        let f: SmallVec<[&str; 16]> = filter.split('/').collect();
        let dollar = filter.starts_with('$');
        let bit = access.bit();
        let section = if subject.generation == self.generation {
            subject.section
        } else {
            self.section_of(subject.username.as_ref().map(|n| &*n.text))
        };
        if let Some(i) = section {
            let t = self.trie(i);
            if t.may_deny(0, &f, 0, subject, dollar) {
                return false;
            }
            if t.covers(0, &f, 0, subject, bit, dollar) {
                return true;
            }
        }
        if !self.has_patterns || subject.wildcard_name {
            return false;
        }
        let t = if subject.username.is_some() {
            &self.patterns
        } else {
            &self.patterns_anonymous
        };
        !t.may_deny(0, &f, 0, subject, dollar) && t.covers(0, &f, 0, subject, bit, dollar)
    }

    /// [`AclFile::check_subject`] for a one-off check (tests, tools): builds the subject and
    /// splits the topic each time.
    pub fn check(&self, client: Client<'_>, access: Access, topic: &str) -> Decision {
        self.check_subject(&self.subject(client), access, &TopicLevels::new(topic))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unique per parsed or loaded instance (see [`super::reload`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// `topic` and `pattern` lines read.
    pub fn rule_count(&self) -> usize {
        self.rules
    }

    /// Distinct `user` sections.
    pub fn user_count(&self) -> usize {
        self.user_index.len()
    }

    /// True if nothing is granted to anyone (an empty file: everything is denied).
    pub fn grants_nothing(&self) -> bool {
        self.sections.iter().all(Trie::is_empty) && self.patterns.is_empty()
    }

    /// Lines that load but probably do not do what was meant.
    pub fn warnings(&self) -> &[FileWarning] {
        &self.warnings
    }
}

impl Authorizer for AclFile {
    fn authorize(&self, client: Client<'_>, action: &Action<'_>) -> Decision {
        match action.access() {
            Some(access) => self.check(client, access, action.topic()),
            // mosquitto 2.0's acl_file grants every (un)subscription; reads are checked per
            // delivered message.
            None => Decision::Allow,
        }
    }
}

#[cfg(test)]
mod tests;
