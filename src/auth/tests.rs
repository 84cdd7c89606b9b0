//! The CONNECT decision and the per-message view, as a mosquitto operator would check them.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use super::identity::CertIdentity;
use super::policy::Verified;
use super::*;
use crate::codec::ReasonCode;

fn pw_file(dir: &Path, users: &[(&str, &str)]) -> Arc<Reloadable<PasswordFile>> {
    let mut text = String::new();
    for (u, p) in users {
        let h = PasswordHash::new_pbkdf2(p.as_bytes(), NonZeroU32::new(3).unwrap()).unwrap();
        text.push_str(&format!("{u}:{}\n", h.encode()));
    }
    let path = dir.join("pw");
    std::fs::write(&path, text).unwrap();
    Arc::new(Reloadable::load(&path).unwrap())
}

fn client<'a>(u: Option<&'a str>, p: Option<&'a str>) -> ConnectCredentials<'a> {
    ConnectCredentials::Client {
        username: u,
        password: p.map(str::as_bytes),
    }
}

/// Drive a CONNECT to its end the way the driver will: run the job (here inline) and finish.
fn decide(
    sec: &ListenerSecurity,
    id: &str,
    creds: ConnectCredentials<'_>,
    cert: Option<CertIdentity<'_>>,
    cache: &mut VerifyCache,
) -> Result<(), Refusal> {
    let step = match sec.begin_connect(id, creds, cert, cache) {
        ConnectStep::Verify(job) => {
            let done: Verified =
                std::thread::scope(|s| s.spawn(move || job.run()).join()).expect("job thread");
            done.finish(cache)
        }
        other => other,
    };
    match step {
        ConnectStep::Accept => Ok(()),
        ConnectStep::Refuse(r) => Err(r),
        ConnectStep::Verify(_) => panic!("finish never asks to verify again"),
    }
}

#[test]
fn without_a_password_file_allow_anonymous_decides_for_everyone() {
    let mut cache = VerifyCache::new(8);
    let open = ListenerSecurity {
        allow_anonymous: true,
        ..ListenerSecurity::default()
    };
    let closed = ListenerSecurity::default();
    for creds in [client(None, None), client(Some("u"), Some("any"))] {
        assert_eq!(decide(&open, "c", creds, None, &mut cache), Ok(()));
    }
    assert_eq!(
        decide(&closed, "c", client(None, None), None, &mut cache),
        Err(Refusal::AnonymousNotAllowed)
    );
    assert_eq!(
        decide(&closed, "c", client(Some("u"), Some("p")), None, &mut cache),
        Err(Refusal::NoPasswordFile)
    );
}

#[test]
fn with_a_password_file_users_need_their_password() {
    let d = tempfile::tempdir().unwrap();
    let file = pw_file(d.path(), &[("alice", "s3cret")]);
    let mut cache = VerifyCache::new(8);
    for allow_anonymous in [false, true] {
        let sec = ListenerSecurity {
            allow_anonymous,
            password_file: Some(file.clone()),
            ..ListenerSecurity::default()
        };
        let mut go = |u, p| decide(&sec, "c", client(u, p), None, &mut cache);
        assert_eq!(go(Some("alice"), Some("s3cret")), Ok(()));
        assert_eq!(
            go(Some("alice"), Some("wrong")),
            Err(Refusal::WrongPassword)
        );
        assert_eq!(go(Some("alice"), None), Err(Refusal::PasswordMissing));
        assert_eq!(go(Some("bob"), Some("s3cret")), Err(Refusal::UnknownUser));
        assert_eq!(go(Some("bob"), None), Err(Refusal::PasswordMissing));
        let anon = go(None, None);
        if allow_anonymous {
            assert_eq!(anon, Ok(()));
        } else {
            assert_eq!(anon, Err(Refusal::AnonymousNotAllowed));
        }
    }
}

#[test]
fn every_password_refusal_is_not_authorized_as_in_mosquitto() {
    for r in [
        Refusal::AnonymousNotAllowed,
        Refusal::NoPasswordFile,
        Refusal::UnknownUser,
        Refusal::WrongPassword,
        Refusal::PasswordMissing,
        Refusal::WillNotAuthorized,
    ] {
        assert_eq!(r.reason_code(), ReasonCode::NOT_AUTHORIZED, "{r}");
    }
    assert_eq!(
        Refusal::ClientId(identity::IdMismatch::Differs).reason_code(),
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
    );
}

#[test]
fn the_cache_answers_a_repeated_login_and_forgets_it_on_reload() {
    let d = tempfile::tempdir().unwrap();
    let file = pw_file(d.path(), &[("alice", "one")]);
    let sec = ListenerSecurity {
        password_file: Some(file.clone()),
        ..ListenerSecurity::default()
    };
    let mut cache = VerifyCache::new(8);
    let creds = client(Some("alice"), Some("one"));
    assert!(matches!(
        sec.begin_connect("c", creds, None, &mut cache),
        ConnectStep::Verify(_)
    ));
    assert_eq!(decide(&sec, "c", creds, None, &mut cache), Ok(()));
    // Now answered on the shard, without a job.
    assert!(matches!(
        sec.begin_connect("c", creds, None, &mut cache),
        ConnectStep::Accept
    ));
    // A wrong password is never cached, and never accepted.
    for _ in 0..2 {
        assert_eq!(
            decide(
                &sec,
                "c",
                client(Some("alice"), Some("two")),
                None,
                &mut cache
            ),
            Err(Refusal::WrongPassword)
        );
    }
    // The password changes on disk and the file is reloaded: the old password stops working
    // at once, the cached success does not outlive the file it was checked against.
    let h = PasswordHash::new_pbkdf2(b"two", NonZeroU32::new(3).unwrap()).unwrap();
    std::fs::write(file.path(), format!("alice:{}\n", h.encode())).unwrap();
    file.reload().unwrap();
    assert!(matches!(
        sec.begin_connect("c", creds, None, &mut cache),
        ConnectStep::Verify(_)
    ));
    assert_eq!(
        decide(&sec, "c", creds, None, &mut cache),
        Err(Refusal::WrongPassword)
    );
    assert_eq!(
        decide(
            &sec,
            "c",
            client(Some("alice"), Some("two")),
            None,
            &mut cache
        ),
        Ok(())
    );
}

#[test]
fn certificate_usernames_skip_the_password_file() {
    let d = tempfile::tempdir().unwrap();
    let sec = ListenerSecurity {
        allow_anonymous: false,
        password_file: Some(pw_file(d.path(), &[])),
        ..ListenerSecurity::default()
    };
    let mut cache = VerifyCache::new(8);
    assert_eq!(
        decide(
            &sec,
            "dev1",
            ConnectCredentials::Certificate { username: "dev1" },
            None,
            &mut cache
        ),
        Ok(())
    );
}

#[test]
fn client_ids_bound_to_certificates() {
    let sec = ListenerSecurity {
        allow_anonymous: true,
        client_id_rule: Some(ClientIdRule::new(IdentitySource::CommonName, None).unwrap()),
        ..ListenerSecurity::default()
    };
    let cert = CertIdentity {
        common_name: Some("dev1"),
        subject: "CN=dev1",
    };
    let mut cache = VerifyCache::new(8);
    let creds = ConnectCredentials::Certificate { username: "dev1" };
    assert_eq!(decide(&sec, "dev1", creds, Some(cert), &mut cache), Ok(()));
    assert_eq!(
        decide(&sec, "dev2", creds, Some(cert), &mut cache),
        Err(Refusal::ClientId(identity::IdMismatch::Differs))
    );
    assert_eq!(
        decide(&sec, "dev1", client(None, None), None, &mut cache),
        Err(Refusal::ClientId(identity::IdMismatch::NoCertificate))
    );
}

#[test]
fn verify_jobs_can_cross_threads() {
    fn is_send<T: Send + 'static>() {}
    is_send::<VerifyJob>();
    is_send::<Verified>();
    fn is_sync<T: Send + Sync>() {}
    is_sync::<PasswordFile>();
    is_sync::<AclFile>();
    is_sync::<Reloadable<AclFile>>();
}

// ---- per message -----------------------------------------------------------------------------

fn publish(topic: &str) -> Action<'_> {
    Action::Publish {
        topic,
        qos: crate::codec::packet::QoS::AtMostOnce,
        retain: false,
    }
}

fn deliver(topic: &str) -> Action<'_> {
    Action::Deliver {
        topic,
        qos: crate::codec::packet::QoS::AtMostOnce,
        retain: false,
    }
}

#[test]
fn sys_and_share_topics_cannot_be_published_acl_or_not() {
    let view = AccessView::new(None);
    let c = Client {
        client_id: "c",
        username: None,
    };
    for t in ["$SYS/broker/uptime", "$SYSTEM/x", "$share/g/t", "$sharex"] {
        assert_eq!(
            view.authorize(c, &publish(t)),
            Decision::Deny(DenyReason::ReservedTopic),
            "{t}"
        );
    }
    assert!(view
        .authorize(c, &publish("$SYS/broker/connection/b1/state"))
        .is_allowed());
    assert!(view.authorize(c, &publish("$other/x")).is_allowed());
    assert!(view.authorize(c, &publish("plain")).is_allowed());
    assert!(view
        .authorize(c, &deliver("$SYS/broker/uptime"))
        .is_allowed());
    let sub = Action::Subscribe {
        filter: "$share/g/t",
        qos: crate::codec::packet::QoS::AtMostOnce,
    };
    assert!(view.authorize(c, &sub).is_allowed());
}

#[test]
fn the_view_keeps_its_version_until_refreshed() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("acl");
    std::fs::write(&path, "pattern readwrite devices/%u/#\n").unwrap();
    let acl = Arc::new(Reloadable::<AclFile>::load(&path).unwrap());
    let sec = ListenerSecurity {
        acl_file: Some(acl.clone()),
        ..ListenerSecurity::default()
    };
    let mut view = sec.access_view();
    let dev = Client {
        client_id: "c",
        username: Some("d1"),
    };
    assert!(view.authorize(dev, &publish("devices/d1/t")).is_allowed());
    assert!(!view.authorize(dev, &deliver("fleet/all")).is_allowed());
    assert!(!view.refresh());

    // Grant a new topic, revoke the old ones.
    std::fs::write(&path, "pattern read fleet/#\n").unwrap();
    acl.reload().unwrap();
    assert!(view.authorize(dev, &publish("devices/d1/t")).is_allowed());
    assert!(view.refresh());
    assert_eq!(view.generation(), acl.generation());
    assert!(!view.authorize(dev, &publish("devices/d1/t")).is_allowed());
    assert!(view.authorize(dev, &deliver("fleet/all")).is_allowed());
    assert!(!view.refresh());

    // A broken file changes nothing.
    std::fs::write(&path, "pattern red fleet/#\n").unwrap();
    assert!(acl.reload().is_err());
    assert!(!view.refresh());
    assert!(view.authorize(dev, &deliver("fleet/all")).is_allowed());
}

#[test]
fn another_backend_plugs_in_through_the_trait() {
    struct OnlyTelemetry;
    impl Authorizer for OnlyTelemetry {
        fn authorize(&self, _c: Client<'_>, a: &Action<'_>) -> Decision {
            if a.topic().starts_with("telemetry/") {
                Decision::Allow
            } else {
                Decision::Deny(DenyReason::Backend)
            }
        }
    }
    let view = AccessView::with_authorizer(Arc::new(OnlyTelemetry));
    let c = Client {
        client_id: "c",
        username: None,
    };
    assert!(view.authorize(c, &publish("telemetry/x")).is_allowed());
    assert_eq!(
        view.authorize(c, &publish("cmd/x")),
        Decision::Deny(DenyReason::Backend)
    );
    // The fixed `$SYS` rule still applies in front of any backend.
    assert_eq!(
        view.authorize(c, &publish("$SYS/x")),
        Decision::Deny(DenyReason::ReservedTopic)
    );
}
