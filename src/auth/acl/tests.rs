//! The ACL grammar rule by rule, the matching rules, and a property test against a naive
//! transcription of mosquitto 2.0.11's `mosquitto_acl_check_default`.

use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::codec::packet::QoS;

fn acl(text: &str) -> AclFile {
    AclFile::parse(Path::new("acl"), text.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> String {
    AclFile::parse(Path::new("acl"), text.as_bytes())
        .unwrap_err()
        .to_string()
}

fn user<'a>(name: &'a str, id: &'a str) -> Client<'a> {
    Client {
        client_id: id,
        username: Some(name),
    }
}

fn anon(id: &str) -> Client<'_> {
    Client {
        client_id: id,
        username: None,
    }
}

fn can(a: &AclFile, c: Client<'_>, access: Access, topic: &str) -> bool {
    a.check(c, access, topic).is_allowed()
}

fn read(a: &AclFile, c: Client<'_>, topic: &str) -> bool {
    can(a, c, Access::Read, topic)
}

fn write(a: &AclFile, c: Client<'_>, topic: &str) -> bool {
    can(a, c, Access::Write, topic)
}

// ---- grammar ---------------------------------------------------------------------------------

#[test]
fn access_words_and_the_readwrite_default() {
    let a = acl("user u\n\
                 topic read r/#\n\
                 topic write w/#\n\
                 topic readwrite rw/#\n\
                 topic both/#\n");
    let u = user("u", "id");
    assert!(read(&a, u, "r/1") && !write(&a, u, "r/1"));
    assert!(!read(&a, u, "w/1") && write(&a, u, "w/1"));
    assert!(read(&a, u, "rw/1") && write(&a, u, "rw/1"));
    assert!(read(&a, u, "both/1") && write(&a, u, "both/1"));
    assert!(!read(&a, u, "other"));
    assert_eq!(a.rule_count(), 4);
    assert_eq!(a.user_count(), 1);
}

#[test]
fn topic_with_only_an_access_word_is_readwrite_on_that_word() {
    let a = acl("user u\ntopic read\n");
    let u = user("u", "id");
    assert!(read(&a, u, "read") && write(&a, u, "read"));
    assert!(!read(&a, u, "x"));
    assert_eq!(a.warnings().len(), 1);
    assert!(a.warnings()[0]
        .to_string()
        .starts_with("acl:2: 'topic read' has no topic"));
}

#[test]
fn topics_may_contain_spaces_and_words_may_be_separated_by_several() {
    let a = acl("user u\n  topic   read   my topic/with spaces  \n");
    assert!(read(&a, user("u", "i"), "my topic/with spaces"));
    assert!(!read(&a, user("u", "i"), "my"));
}

#[test]
fn comments_blank_lines_and_crlf() {
    let a = acl("# comment\n\n   \r\nuser u\r\n#topic read secret\r\ntopic read a\r\n");
    assert!(read(&a, user("u", "i"), "a"));
    assert!(!read(&a, user("u", "i"), "secret"));
    assert_eq!(a.rule_count(), 1);
}

#[test]
fn usernames_are_the_rest_of_the_line_trimmed() {
    let a = acl("user   John Smith  \ntopic read a\n");
    assert!(read(&a, user("John Smith", "i"), "a"));
    assert!(!read(&a, user("John", "i"), "a"));
}

#[test]
fn a_repeated_user_section_adds_rules() {
    let a = acl("user u\ntopic read a\nuser v\ntopic read b\nuser u\ntopic read c\n");
    let u = user("u", "i");
    assert!(read(&a, u, "a") && read(&a, u, "c") && !read(&a, u, "b"));
    assert_eq!(a.user_count(), 2);
}

#[test]
fn the_anonymous_section_is_only_for_clients_without_a_username() {
    let a = acl("topic read public/#\nuser u\ntopic read private/#\n");
    assert!(read(&a, anon("i"), "public/x"));
    assert!(!read(&a, anon("i"), "private/x"));
    // A client with a username never falls back to the anonymous section.
    assert!(!read(&a, user("u", "i"), "public/x"));
    assert!(read(&a, user("u", "i"), "private/x"));
    assert!(!read(&a, user("stranger", "i"), "public/x"));
    // The empty username is a username.
    assert!(!read(&a, user("", "i"), "public/x"));
}

#[test]
fn patterns_apply_to_everyone_wherever_they_are_written() {
    let a = acl("user u\ntopic read a\npattern read clients/%c/#\nuser v\n");
    for c in [
        user("u", "c1"),
        user("v", "c1"),
        user("w", "c1"),
        anon("c1"),
    ] {
        assert!(read(&a, c, "clients/c1/x"), "{c:?}");
        assert!(!read(&a, c, "clients/c2/x"), "{c:?}");
    }
}

#[test]
fn parse_errors_name_the_line_and_why() {
    let cases: &[(&str, &str)] = &[
        ("user u\ntopic\n", "acl:2: 'topic' without a topic"),
        ("pattern   \n", "acl:1: 'pattern' without a topic"),
        (
            "\ntopic rw a/b\n",
            "acl:2: invalid access type \"rw\" (expected read, write, readwrite or deny)",
        ),
        (
            "topic read a/b+\n",
            "acl:1: invalid topic \"a/b+\": '+' must be a whole level",
        ),
        (
            "topic read a/#/b\n",
            "acl:1: invalid topic \"a/#/b\": '#' must be the whole last level",
        ),
        ("pattern read a#\n", "acl:1: invalid topic \"a#\""),
        ("user\n", "acl:1: 'user' without a username"),
        ("user    \n", "acl:1: 'user' without a username"),
        (
            "topics read a\n",
            "acl:1: invalid line: expected 'topic', 'pattern', 'user' or a '#' comment, got \"topics\"",
        ),
        ("  # indented comment\n", "acl:1: invalid line"),
        ("topic read\ta/b\n", "acl:1: a tab in the access word or topic \"read\\ta/b\""),
        ("user\tu\n", "acl:1: a tab in the keyword"),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.starts_with(want), "{text:?}: {e}");
    }
    let deep = format!("topic read {}\n", vec!["a"; 202].join("/"));
    assert!(err(&deep).contains("more than 201 levels"));
    assert!(acl(&format!("topic read {}\n", vec!["a"; 201].join("/"))).rule_count() == 1);
    let e = AclFile::parse(Path::new("acl"), b"topic read a\ntopic read \xff\n").unwrap_err();
    assert_eq!(e.to_string(), "acl:2: is not valid UTF-8");
}

#[test]
fn load_reports_unreadable_files() {
    let e = AclFile::load(Path::new("/nonexistent/midge-acl")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/midge-acl: cannot read ACL file: "),
        "{e}"
    );
}

#[test]
fn warnings_for_patterns_without_names_and_names_in_topic_lines() {
    let a = acl("pattern read fixed/#\ntopic read a/%u\n");
    let w: Vec<String> = a.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].starts_with("acl:1: pattern \"fixed/#\" contains neither"));
    assert!(w[1].starts_with("acl:2: topic \"a/%u\" contains %u or %c"));
    // In a topic line `%u` is literal text.
    assert!(read(&a, anon("i"), "a/%u"));
}

// ---- %u and %c -------------------------------------------------------------------------------

#[test]
fn percent_u_and_c_are_whole_levels() {
    let a = acl("pattern readwrite devices/%u/#\npattern read ids/%c\n");
    let d1 = user("d1", "c1");
    assert!(read(&a, d1, "devices/d1") && write(&a, d1, "devices/d1/telemetry"));
    assert!(!read(&a, d1, "devices/d2/telemetry"));
    assert!(!read(&a, d1, "devices/d1x/telemetry"));
    assert!(!read(&a, d1, "devices/%u/telemetry"));
    assert!(read(&a, d1, "ids/c1") && !write(&a, d1, "ids/c1"));
    assert!(!read(&a, d1, "ids/c1/more"));
    // A username with a '/' never equals one level (mosquitto would substitute it as text and
    // give `d1/sub` the subtree devices/d1/sub/# of user d1).
    let sneaky = user("d1/sub", "c9");
    assert!(!read(&a, sneaky, "devices/d1/sub/x"));
    assert!(!read(&a, user("", "c1"), "devices/d1"));
    assert!(read(&a, user("", "c1"), "devices//x"));
}

#[test]
fn percent_u_patterns_never_apply_to_anonymous_clients() {
    let a = acl("pattern read a/%u/#\npattern read b/%c/#\npattern read c/%u/%c\n");
    let c = anon("c1");
    assert!(!read(&a, c, "a//x"));
    assert!(read(&a, c, "b/c1/x"));
    assert!(!read(&a, c, "c//c1"));
    assert!(read(&a, user("u", "c1"), "c/u/c1"));
}

#[test]
fn text_around_a_name_inside_a_level_is_matched_literally() {
    let a = acl("pattern read x/id-%c/%u.log\n");
    assert!(read(&a, user("u", "c1"), "x/id-c1/u.log"));
    assert!(!read(&a, user("u", "c1"), "x/id-c2/u.log"));
    assert!(!read(&a, user("u", "c1"), "x/idc1/u.log"));
    assert!(!read(&a, user("u", "c1"), "x/id-c1/u.lo"));
    // A '%' not followed by u or c is plain text.
    let b = acl("pattern read %x%c%\n");
    assert!(read(&b, anon("c1"), "%xc1%"));
}

// ---- $ topics --------------------------------------------------------------------------------

#[test]
fn dollar_topics_need_rules_that_start_with_dollar() {
    let a = acl("user u\ntopic read #\ntopic read +/x\ntopic read $SYS/broker/#\n");
    let u = user("u", "i");
    assert!(read(&a, u, "a/b") && read(&a, u, "y/x"));
    assert!(!read(&a, u, "$SYS/uptime"));
    assert!(!read(&a, u, "$a/x"));
    assert!(read(&a, u, "$SYS/broker/uptime"));
    assert!(read(&a, u, "$SYS/broker"));
    // Deeper levels may start with '$' without any special rule.
    assert!(read(&a, u, "a/$x"));
}

#[test]
fn a_name_starting_with_dollar_does_not_reach_dollar_topics_through_a_first_level_pattern() {
    let a = acl("pattern read %u/#\npattern read $%c/#\n");
    assert!(!read(&a, user("$SYS", "i"), "$SYS/broker/uptime"));
    assert!(read(&a, user("u", "i"), "u/x"));
    // A pattern whose first level starts with a literal '$' does match `$` topics.
    assert!(read(&a, user("u", "c1"), "$c1/x"));
}

// ---- precedence ------------------------------------------------------------------------------

#[test]
fn deny_wins_inside_a_section_whatever_the_order() {
    for text in [
        "user u\ntopic readwrite a/#\ntopic deny a/secret/#\n",
        "user u\ntopic deny a/secret/#\ntopic readwrite a/#\n",
    ] {
        let a = acl(text);
        let u = user("u", "i");
        assert!(read(&a, u, "a/public"), "{text}");
        assert!(
            !read(&a, u, "a/secret/x") && !write(&a, u, "a/secret"),
            "{text}"
        );
        assert_eq!(
            a.check(u, Access::Read, "a/secret/x"),
            Decision::Deny(DenyReason::DenyRule)
        );
    }
}

#[test]
fn the_own_section_is_decided_before_the_patterns() {
    // mosquitto checks the user's list completely before any pattern.
    let a = acl("pattern deny secret/#\nuser alice\ntopic read secret/#\n");
    assert!(read(&a, user("alice", "i"), "secret/x"));
    assert!(!read(&a, user("bob", "i"), "secret/x"));
    let b = acl("pattern read shared/#\nuser alice\ntopic deny shared/private\n");
    assert!(!read(&b, user("alice", "i"), "shared/private"));
    assert!(read(&b, user("alice", "i"), "shared/other"));
    assert!(read(&b, user("bob", "i"), "shared/private"));
    // A matching rule without the right access bit falls through to the patterns.
    let c = acl("pattern write devices/%u/#\nuser d1\ntopic read devices/#\n");
    assert!(write(&c, user("d1", "i"), "devices/d1/x"));
    assert!(!write(&c, user("d1", "i"), "devices/d2/x"));
    assert!(read(&c, user("d1", "i"), "devices/d2/x"));
}

#[test]
fn pattern_deny_wins_over_pattern_grants() {
    let a = acl("pattern readwrite devices/%u/#\npattern deny devices/%u/admin/#\n");
    assert!(write(&a, user("d", "i"), "devices/d/x"));
    assert!(!write(&a, user("d", "i"), "devices/d/admin/x"));
}

#[test]
fn no_match_means_deny_and_an_empty_file_denies_everything() {
    let a = acl("");
    assert!(a.grants_nothing());
    assert_eq!(
        a.check(anon("i"), Access::Read, "a"),
        Decision::Deny(DenyReason::NoMatch)
    );
    let b = acl("# only comments\n\n");
    assert!(b.grants_nothing() && !read(&b, user("u", "i"), "a"));
    let c = acl("user u\ntopic read a\n");
    assert!(!c.grants_nothing());
    assert!(!read(&c, user("u", "i"), "b"));
}

// ---- '+' and '#' in names --------------------------------------------------------------------

#[test]
fn wildcards_in_names_are_denied_while_patterns_exist() {
    let a = acl("user a+b\ntopic read own\npattern read devices/%u/#\npattern read ids/%c\n");
    // The user's own section still applies (mosquitto checks names only before the patterns).
    assert!(read(&a, user("a+b", "i"), "own"));
    assert_eq!(
        a.check(user("a+b", "i"), Access::Read, "devices/a+b/x"),
        Decision::Deny(DenyReason::WildcardInName)
    );
    assert!(!read(&a, user("u#", "i"), "devices/u#"));
    // A wildcard in the client id is enough, even for a %u pattern.
    assert!(!read(&a, user("u", "c+"), "devices/u/x"));
    assert!(!read(&a, anon("c#"), "ids/c#"));
    assert!(read(&a, user("u", "c"), "devices/u/x"));
    // Without patterns the rule does not apply.
    let b = acl("user a+b\ntopic read own\n");
    assert!(read(&b, user("a+b", "c#"), "own"));
}

// ---- actions ---------------------------------------------------------------------------------

#[test]
fn actions_map_to_read_and_write_and_subscriptions_are_granted() {
    let a = acl("user u\ntopic read in/#\ntopic write out/#\n");
    let u = user("u", "i");
    let q = QoS::AtLeastOnce;
    let allow = |act: Action<'_>| a.authorize(u, &act).is_allowed();
    assert!(allow(Action::Deliver {
        topic: "in/x",
        qos: q,
        retain: true
    }));
    assert!(!allow(Action::Publish {
        topic: "in/x",
        qos: q,
        retain: false
    }));
    assert!(allow(Action::Publish {
        topic: "out/x",
        qos: q,
        retain: false
    }));
    assert!(allow(Action::Will {
        topic: "out/x",
        qos: q,
        retain: true
    }));
    assert!(!allow(Action::Will {
        topic: "in/x",
        qos: q,
        retain: true
    }));
    // mosquitto 2.0: the acl_file grants every SUBSCRIBE; reads are checked on delivery.
    assert!(allow(Action::Subscribe {
        filter: "#",
        qos: q
    }));
    assert!(allow(Action::Subscribe {
        filter: "nothing/readable",
        qos: q
    }));
    assert!(allow(Action::Unsubscribe { filter: "#" }));
}

#[test]
fn a_large_acl_answers_from_the_right_section() {
    let mut text = String::from("pattern readwrite devices/%u/#\npattern read fleet/%c/cmd\n");
    for i in 0..5000 {
        text.push_str(&format!("user dev{i}\ntopic read groups/g{}/#\n", i % 50));
    }
    let a = acl(&text);
    assert_eq!(a.user_count(), 5000);
    assert_eq!(a.rule_count(), 5002);
    assert!(read(&a, user("dev77", "c"), "groups/g27/x"));
    assert!(!read(&a, user("dev77", "c"), "groups/g28/x"));
    assert!(write(&a, user("dev77", "c"), "devices/dev77/t"));
    assert!(!write(&a, user("dev77", "c"), "devices/dev78/t"));
    assert!(read(&a, user("dev77", "c7"), "fleet/c7/cmd"));
}

// ---- against a naive transcription of mosquitto ----------------------------------------------

/// mosquitto's list of rules for one user, deny rules moved to the front as `add__acl` does.
#[derive(Debug, Clone, Default)]
struct RefList(Vec<(String, u8)>);

impl RefList {
    fn add(&mut self, topic: &str, access: u8) {
        if access == 0 {
            self.0.insert(0, (topic.into(), 0));
        } else {
            self.0.push((topic.into(), access));
        }
    }
}

#[derive(Debug, Default)]
struct RefAcl {
    anonymous: Option<RefList>,
    users: Vec<(String, RefList)>,
    patterns: Option<RefList>,
}

/// `mosquitto_topic_matches_sub` for valid inputs: filter semantics, and the `$` rule.
fn ref_matches(sub: &str, topic: &str) -> bool {
    if sub.starts_with('$') != topic.starts_with('$') {
        return false;
    }
    fn go(s: &[&str], t: &[&str]) -> bool {
        match (s.first(), t.first()) {
            (Some(&"#"), _) => true,
            (Some(&"+"), Some(_)) => go(&s[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && go(&s[1..], &t[1..]),
            (None, None) => true,
            _ => false,
        }
    }
    let s: Vec<&str> = sub.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    go(&s, &t)
}

/// `mosquitto_acl_check_default`, line for line (textual substitution included).
fn ref_check(a: &RefAcl, username: Option<&str>, id: &str, access: u8, topic: &str) -> bool {
    let own = match username {
        Some(u) => a.users.iter().find(|(n, _)| n == u).map(|(_, l)| l),
        None => a.anonymous.as_ref(),
    };
    if own.is_none() && a.patterns.is_none() {
        return false;
    }
    if let Some(list) = own {
        for (t, acc) in &list.0 {
            if topic.starts_with('$') && !t.starts_with('$') {
                continue;
            }
            if ref_matches(t, topic) {
                if *acc == 0 {
                    return false;
                }
                if access & acc != 0 {
                    return true;
                }
            }
        }
    }
    let Some(patterns) = &a.patterns else {
        return false;
    };
    if username.is_some_and(|u| u.contains(['+', '#'])) || id.contains(['+', '#']) {
        return false;
    }
    for (t, acc) in &patterns.0 {
        if t.contains("%u") && username.is_none() {
            continue;
        }
        let mut s = String::new();
        let b = t.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if i + 1 < b.len() && b[i] == b'%' && b[i + 1] == b'c' {
                s.push_str(id);
                i += 2;
            } else if i + 1 < b.len() && b[i] == b'%' && b[i + 1] == b'u' && username.is_some() {
                s.push_str(username.unwrap_or_default());
                i += 2;
            } else {
                s.push(b[i] as char);
                i += 1;
            }
        }
        if ref_matches(&s, topic) {
            if *acc == 0 {
                return false;
            }
            if access & acc != 0 {
                return true;
            }
        }
    }
    false
}

#[derive(Debug, Clone)]
enum Line {
    Topic(u8, String),
    Pattern(u8, String),
    User(String),
}

fn access_name(a: u8) -> &'static str {
    match a {
        0 => "deny",
        1 => "read",
        2 => "write",
        _ => "readwrite",
    }
}

fn filter_strategy(pattern: bool) -> impl Strategy<Value = String> {
    let mut levels = vec!["a", "b", "ab", "", "+", "c1", "$SYS", "xa"];
    if pattern {
        levels.extend(["%u", "%c", "x%u", "%c-y", "%u%c"]);
    }
    (
        prop::collection::vec(prop::sample::select(levels), 1..4),
        any::<bool>(),
    )
        .prop_map(|(mut v, hash)| {
            if hash {
                v.push("#");
            }
            v.join("/")
        })
        // An empty filter is not valid MQTT (and `topic read ` would read as the topic "read").
        .prop_filter("non-empty filter", |f| !f.is_empty())
}

fn line_strategy() -> impl Strategy<Value = Line> {
    prop_oneof![
        (0u8..4, filter_strategy(false)).prop_map(|(a, f)| Line::Topic(a, f)),
        (0u8..4, filter_strategy(true)).prop_map(|(a, f)| Line::Pattern(a, f)),
        prop::sample::select(vec!["a", "b", "ab", "x+", "%c"])
            .prop_map(|u| Line::User(u.to_string())),
    ]
}

fn topic_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "a", "b", "ab", "", "c1", "$SYS", "$x", "xa", "c1-y", "ac1", "%c",
        ]),
        1..5,
    )
    .prop_map(|v| v.join("/"))
    .prop_filter("non-empty topic", |t| !t.is_empty())
}

fn build(lines: &[Line]) -> (String, RefAcl) {
    let mut text = String::new();
    let mut r = RefAcl::default();
    let mut current: Option<usize> = None;
    for l in lines {
        match l {
            Line::User(u) => {
                text.push_str(&format!("user {u}\n"));
                current = Some(match r.users.iter().position(|(n, _)| n == u) {
                    Some(i) => i,
                    None => {
                        r.users.push((u.clone(), RefList::default()));
                        r.users.len() - 1
                    }
                });
            }
            Line::Topic(a, f) => {
                text.push_str(&format!("topic {} {f}\n", access_name(*a)));
                match current {
                    None => r.anonymous.get_or_insert_with(RefList::default).add(f, *a),
                    Some(i) => r.users[i].1.add(f, *a),
                }
            }
            Line::Pattern(a, f) => {
                text.push_str(&format!("pattern {} {f}\n", access_name(*a)));
                r.patterns.get_or_insert_with(RefList::default).add(f, *a);
            }
        }
    }
    (text, r)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn matches_mosquittos_algorithm(
        lines in prop::collection::vec(line_strategy(), 0..12),
        checks in prop::collection::vec((
            prop::option::of(prop::sample::select(vec!["a", "b", "ab", "x+", "y#", "%c", ""])),
            prop::sample::select(vec!["c1", "a", "c+", "%u", "xa"]),
            1u8..3,
            topic_strategy(),
        ), 1..24),
    ) {
        let (text, reference) = build(&lines);
        let compiled = acl(&text);
        for (username, id, access, topic) in checks {
            let want = ref_check(&reference, username, id, access, &topic);
            let access = if access == 1 { Access::Read } else { Access::Write };
            let got = compiled
                .check(Client { client_id: id, username }, access, &topic)
                .is_allowed();
            prop_assert_eq!(
                got, want,
                "file:\n{}\nuser {:?} id {:?} {:?} {:?}", text, username, id, access, topic
            );
        }
    }
}

#[test]
fn a_subject_made_for_another_version_is_resolved_again() {
    // u's section is the first in `old` and the second in `new`; using the stale index on
    // `new` would hand u the rules of v.
    let old = acl("user u\ntopic read a\nuser v\ntopic read b\n");
    let new = acl("user v\ntopic read b\nuser u\ntopic read c\n");
    let s = old.subject(user("u", "i"));
    assert!(old
        .check_subject(&s, Access::Read, &TopicLevels::new("a"))
        .is_allowed());
    assert!(!new
        .check_subject(&s, Access::Read, &TopicLevels::new("b"))
        .is_allowed());
    assert!(new
        .check_subject(&s, Access::Read, &TopicLevels::new("c"))
        .is_allowed());
    assert_ne!(old.generation(), new.generation());
}

#[test]
fn topic_levels_split_like_mqtt() {
    for t in ["a", "a/b", "/", "a//b/", "$SYS/x", ""] {
        let l = TopicLevels::new(t);
        let want: Vec<&str> = t.split('/').collect();
        let got: Vec<&str> = l.levels.iter().map(|(s, _)| *s).collect();
        assert_eq!(got, want, "{t:?}");
        for (s, h) in &l.levels {
            assert_eq!(*h, level_hash(s));
        }
        assert_eq!(l.dollar, t.starts_with('$'));
    }
}

#[test]
fn nodes_with_many_children_use_the_map() {
    let mut text = String::new();
    for i in 0..100 {
        text.push_str(&format!("topic read t/{i}/x\n"));
    }
    text.push_str("topic deny t/50/x\n");
    let a = acl(&text);
    for i in 0..100 {
        let t = format!("t/{i}/x");
        assert_eq!(read(&a, anon("c"), &t), i != 50, "{t}");
        assert!(!read(&a, anon("c"), &format!("t/{i}/y")));
    }
    assert!(!read(&a, anon("c"), "t/100/x"));
}

// ---- whole-filter grants (deliveries without a per-message check) ----------------------------

fn grants(a: &AclFile, c: Client<'_>, access: Access, filter: &str) -> bool {
    a.grants_all(&a.subject(c), access, filter)
}

#[test]
fn the_fleet_pattern_grants_a_devices_own_tree_and_nothing_wider() {
    let a = acl("pattern readwrite devices/%u/#\n");
    let d = user("dev1", "c1");
    for f in [
        "devices/dev1/#",
        "devices/dev1/cmd",
        "devices/dev1/+/x",
        "devices/dev1",
    ] {
        assert!(grants(&a, d, Access::Read, f), "{f}");
    }
    for f in [
        "#",
        "devices/+/cmd",
        "devices/#",
        "devices/dev2/#",
        "$SYS/#",
        "+/dev1/#",
    ] {
        assert!(!grants(&a, d, Access::Read, f), "{f}");
    }
    // Names with wildcards never get pattern grants; anonymous clients never get %u ones.
    assert!(!grants(&a, user("d+", "c"), Access::Read, "devices/d+/#"));
    assert!(!grants(&a, anon("c"), Access::Read, "devices/#"));
}

#[test]
fn a_deny_that_may_match_part_of_the_filter_withholds_the_grant() {
    let a = acl("user u\ntopic read a/#\ntopic deny a/secret\npattern read p/%c/#\n");
    let u = user("u", "c1");
    assert!(grants(&a, u, Access::Read, "a/public/#"));
    assert!(!grants(&a, u, Access::Read, "a/#"));
    assert!(!grants(&a, u, Access::Read, "a/+"));
    assert!(!grants(&a, u, Access::Write, "a/public"));
    // The section decides first: a section deny also withholds a pattern's grant.
    assert!(grants(&a, u, Access::Read, "p/c1/#"));
    let b = acl("user u\ntopic deny p/#\npattern read p/%c/#\n");
    assert!(!grants(&b, u, Access::Read, "p/c1/#"));
    // `#` first: a `$` deny is out of its reach, a plain one is not.
    let c = acl("user u\ntopic read #\ntopic deny $SYS/#\n");
    assert!(grants(&c, u, Access::Read, "#"));
    assert!(!grants(&c, u, Access::Read, "$SYS/broker/uptime"));
    let d = acl("user u\ntopic read #\ntopic deny x/+/y\n");
    assert!(!grants(&d, u, Access::Read, "#"));
    assert!(grants(&d, u, Access::Read, "z/#"));
}

/// Topics the filter matches, made by filling its wildcards with sample levels.
fn instances(filter: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    for (i, level) in filter.split('/').enumerate() {
        let options: Vec<&str> = match level {
            "+" => vec!["a", "", "c1", "zz"],
            "#" => vec!["", "a", "a/b", "c1/%c"],
            l => vec![l],
        };
        let mut next = Vec::new();
        for prefix in &out {
            for o in &options {
                if level == "#" && o.is_empty() {
                    // `x/#` also matches `x` itself.
                    next.push(prefix.clone());
                    if i == 0 {
                        continue;
                    }
                }
                if i == 0 {
                    next.push(o.to_string());
                } else {
                    next.push(format!("{prefix}/{o}"));
                }
            }
        }
        out = next;
    }
    out.retain(|t| !t.is_empty());
    out
}

fn sub_filter_strategy() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "ab", "", "c1", "$SYS", "xa", "+", "%c"]),
            1..4,
        ),
        any::<bool>(),
    )
        .prop_map(|(mut v, hash)| {
            if hash {
                v.push("#");
            }
            v.join("/")
        })
        .prop_filter("non-empty filter", |f| !f.is_empty())
}

/// A whole-filter grant is never wrong: every topic the filter matches passes mosquitto's own
/// check. (Run by hand, to also check that the cases exercised grants at all.)
#[test]
fn a_whole_filter_grant_holds_for_every_matching_topic() {
    let strategy = (
        prop::collection::vec(line_strategy(), 0..10),
        prop::option::of(prop::sample::select(vec!["a", "b", "ab", "x+", ""])),
        prop::sample::select(vec!["c1", "a", "c+", "xa"]),
        1u8..3,
        prop::collection::vec(sub_filter_strategy(), 1..8),
        prop::collection::vec(topic_strategy(), 0..16),
    );
    let granted = std::cell::Cell::new(0usize);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 600,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &strategy,
            |(lines, username, id, access, filters, topics)| {
                let (text, reference) = build(&lines);
                let compiled = acl(&text);
                let acc = if access == 1 {
                    Access::Read
                } else {
                    Access::Write
                };
                let client = Client {
                    client_id: id,
                    username,
                };
                // Besides random filters, the rules' own filters (names filled in) and narrower
                // forms of them: those are the ones a grant is likely for.
                let mut candidates = filters;
                for l in &lines {
                    let (Line::Topic(_, f) | Line::Pattern(_, f)) = l else {
                        continue;
                    };
                    let mut f = f.clone();
                    if matches!(l, Line::Pattern(..)) {
                        f = f.replace("%c", id);
                        match username {
                            Some(u) => f = f.replace("%u", u),
                            None if f.contains("%u") => continue,
                            None => {}
                        }
                    }
                    candidates.push(f.replace('#', "ab/#"));
                    candidates.push(f.replace('+', "a"));
                    candidates.push(f);
                }
                for filter in candidates {
                    if !grants(&compiled, client, acc, &filter) {
                        continue;
                    }
                    granted.set(granted.get() + 1);
                    let mut probe = instances(&filter);
                    probe.extend(topics.iter().filter(|t| ref_matches(&filter, t)).cloned());
                    for t in probe {
                        prop_assert!(
                            ref_matches(&filter, &t),
                            "bad instance {:?} of {:?}",
                            t,
                            filter
                        );
                        prop_assert!(
                        ref_check(&reference, username, id, access, &t),
                        "file:\n{}\nuser {:?} id {:?} {:?}: {:?} granted whole, but {:?} is denied",
                        text,
                        username,
                        id,
                        acc,
                        filter,
                        t
                    );
                    }
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} whole-filter grants checked", granted.get());
    assert!(
        granted.get() > 300,
        "only {} whole-filter grants in 600 cases: the test exercises too little",
        granted.get()
    );
}
