//! Authentication and authorization costs.
//!
//! * ACL check per message: a 10,000-line ACL (4 patterns, 5,000 `user` sections with one
//!   `topic` line each) against no ACL at all (only mosquitto's fixed `$SYS` write rule), for
//!   a device publishing to its own tree (granted by `pattern readwrite devices/%u/#`), a
//!   delivery granted by its user section, and a denied publish to another device's tree.
//! * `$7$` password verification at 101 (mosquitto_passwd's default) and 1,000 iterations,
//!   and the same login answered by the per-shard verification cache.
//!
//! Run: `cargo bench --bench auth -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use midge::auth::{
    AccessView, AclFile, Action, Client, ConnectCredentials, ConnectStep, ListenerSecurity,
    PasswordFile, PasswordHash, Reloadable, TopicLevels, VerifyCache,
};
use midge::codec::QoS;

const USERS: usize = 5000;

fn big_acl() -> String {
    let mut text = String::from(
        "pattern readwrite devices/%u/#\n\
         pattern read fleet/%c/cmd/#\n\
         pattern deny devices/%u/admin/#\n\
         pattern write $SYS/broker/connection/%c/state\n",
    );
    for i in 0..USERS {
        text.push_str(&format!("user dev{i}\ntopic read groups/g{}/#\n", i % 50));
    }
    text
}

fn acl(c: &mut Criterion) {
    let text = big_acl();
    assert_eq!(text.lines().count(), 4 + 2 * USERS);
    let file = AclFile::parse(Path::new("bench.acl"), text.as_bytes()).expect("acl");
    let big = AccessView::new(Some(Arc::new(Reloadable::from_value(
        Path::new("bench.acl"),
        file,
    ))));
    let none = AccessView::new(None);
    let dev = Client {
        client_id: "dev1234",
        username: Some("dev1234"),
    };
    let own = Action::Publish {
        topic: "devices/dev1234/telemetry",
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    let group = Action::Deliver {
        topic: "groups/g34/firmware",
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    let other = Action::Publish {
        topic: "devices/dev99/telemetry",
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    assert!(big.authorize(dev, &own).is_allowed());
    let s = big.subject(dev);
    assert!(big
        .authorize_subject(&s, &own, &TopicLevels::new(own.topic()))
        .is_allowed());
    assert!(big.authorize(dev, &group).is_allowed());
    assert!(!big.authorize(dev, &other).is_allowed());
    assert!(none.authorize(dev, &own).is_allowed());

    // The per-message path: the subject is made once per connection; the topic is split once
    // per message ("split+check") and shared by further checks of the same message ("check").
    let none_subject = none.subject(dev);
    let big_subject = big.subject(dev);
    let mut g = c.benchmark_group("acl_check");
    g.bench_function("no_acl/publish_own", |b| {
        let levels = TopicLevels::new(own.topic());
        b.iter(|| black_box(none.authorize_subject(&none_subject, black_box(&own), &levels)))
    });
    for (name, action) in [
        ("publish_own_pattern", &own),
        ("deliver_user_section", &group),
        ("publish_other_denied", &other),
    ] {
        g.bench_function(format!("10k_lines/{name}/split+check"), |b| {
            b.iter(|| {
                let a = black_box(action);
                let levels = TopicLevels::new(a.topic());
                black_box(big.authorize_subject(&big_subject, a, &levels))
            })
        });
        let levels = TopicLevels::new(action.topic());
        g.bench_function(format!("10k_lines/{name}/check"), |b| {
            b.iter(|| black_box(big.authorize_subject(&big_subject, black_box(action), &levels)))
        });
    }
    g.finish();
}

fn passwords(c: &mut Criterion) {
    let mut g = c.benchmark_group("password_verify");
    g.sample_size(20);
    for iterations in [101u32, 1000] {
        let h = PasswordHash::new_pbkdf2(b"s3cret", NonZeroU32::new(iterations).unwrap())
            .expect("hash");
        let text = format!("dev1234:{}\n", h.encode());
        let file = PasswordFile::parse(Path::new("bench.pw"), text.as_bytes()).expect("file");
        g.bench_function(format!("pbkdf2_{iterations}/no_cache"), |b| {
            b.iter(|| black_box(file.verify(black_box("dev1234"), Some(black_box(b"s3cret")))))
        });
        let sec = ListenerSecurity {
            password_file: Some(Arc::new(Reloadable::from_value(
                Path::new("bench.pw"),
                file,
            ))),
            ..ListenerSecurity::default()
        };
        let mut cache = VerifyCache::default();
        let creds = ConnectCredentials::Client {
            username: Some("dev1234"),
            password: Some(b"s3cret"),
        };
        match sec.begin_connect("dev1234", creds, None, &mut cache) {
            ConnectStep::Verify(job) => {
                let step = job.run().finish(&mut cache);
                assert!(matches!(step, ConnectStep::Accept));
            }
            other => panic!("first login must be verified: {other:?}"),
        }
        g.bench_function(format!("pbkdf2_{iterations}/cache_hit"), |b| {
            b.iter(|| {
                let step = sec.begin_connect("dev1234", black_box(creds), None, &mut cache);
                assert!(matches!(step, ConnectStep::Accept));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, acl, passwords);
criterion_main!(benches);
