//! `password_file`, `acl_file`, `allow_anonymous`, `per_listener_settings` and
//! `require_client_id_match_identity`, scoped as mosquitto 2.0's conf.c scopes them.

use std::os::unix::fs::PermissionsExt;

use super::*;

const ACL: &str = "pattern readwrite devices/%u/#\n";

impl Fixture {
    /// A valid password file (mode 0600) named `name`.
    fn passwd(&self, name: &str) -> String {
        let h =
            crate::auth::PasswordHash::new_pbkdf2(b"pw", std::num::NonZeroU32::MIN).expect("hash");
        let p = self.write(name, &format!("alice:{}\n", h.encode()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        p.display().to_string()
    }

    fn acl(&self, name: &str, text: &str) -> String {
        self.write(name, text).display().to_string()
    }
}

fn files(c: &Config) -> Vec<(Option<PathBuf>, Option<PathBuf>)> {
    c.listeners
        .iter()
        .map(|l| {
            (
                l.password_file.as_ref().map(|f| f.path.clone()),
                l.acl_file.as_ref().map(|f| f.path.clone()),
            )
        })
        .collect()
}

#[test]
fn global_files_apply_to_every_listener_wherever_written() {
    let f = Fixture::new();
    let pw = f.passwd("pw");
    let acl = f.acl("acl", ACL);
    let c = f.ok(&format!(
        "listener 1883\nlistener 1884 127.0.0.1\npassword_file {pw}\nlistener 1885 127.0.0.1\n\
         acl_file {acl}\n"
    ));
    let want = (Some(PathBuf::from(&pw)), Some(PathBuf::from(&acl)));
    assert_eq!(files(&c), vec![want.clone(), want.clone(), want]);
    assert_eq!(
        c.listeners[0]
            .password_file
            .as_ref()
            .map(|f| f.origin.to_string()),
        Some(format!("{}:3", f.path("midge.conf").display()))
    );
    // A listener that denies anonymous clients but has a password file can admit someone.
    assert!(!c
        .warnings
        .iter()
        .any(|w| w.message.contains("no client can connect")));
}

#[test]
fn per_listener_files_apply_to_their_section_only() {
    let f = Fixture::new();
    let pw1 = f.passwd("pw1");
    let pw2 = f.passwd("pw2");
    let acl = f.acl("acl", ACL);
    let c = f.ok(&format!(
        "per_listener_settings true\nlistener 1883\npassword_file {pw1}\nacl_file {acl}\n\
         listener 1884 127.0.0.1\nallow_anonymous true\nlistener 1885 127.0.0.1\npassword_file {pw2}\n"
    ));
    assert_eq!(
        files(&c),
        vec![
            (Some(PathBuf::from(&pw1)), Some(PathBuf::from(&acl))),
            (None, None),
            (Some(PathBuf::from(&pw2)), None),
        ]
    );
    assert!(c.listeners[1].allow_anonymous && !c.listeners[2].allow_anonymous);
}

#[test]
fn per_listener_password_file_before_any_listener_makes_the_default_listener() {
    let f = Fixture::new();
    let pw = f.passwd("pw");
    let c = f.ok(&format!(
        "per_listener_settings true\npassword_file {pw}\nlistener 1884 127.0.0.1\n"
    ));
    assert_eq!(c.listeners.len(), 2);
    assert_eq!(c.listeners[0].addr, addr("0.0.0.0:1883"));
    assert_eq!(files(&c)[0].0, Some(PathBuf::from(&pw)));
    assert_eq!(files(&c)[1], (None, None));
    assert!(has_warning(&c, "password_file"));
}

#[test]
fn per_listener_acl_file_that_protects_no_listener_is_refused() {
    let f = Fixture::new();
    let acl = f.acl("acl", ACL);
    let e = f.err(&format!(
        "per_listener_settings true\nacl_file {acl}\nlistener 1884 127.0.0.1\n"
    ));
    assert!(
        e.starts_with(
            "FILE:2: key 'acl_file': with per_listener_settings true, an acl_file before"
        ),
        "{e}"
    );
    // With the default listener configured it applies to it.
    let c = f.ok(&format!(
        "per_listener_settings true\nport 1884\nacl_file {acl}\nlistener 1885 127.0.0.1\n"
    ));
    assert_eq!(
        files(&c),
        vec![(None, Some(PathBuf::from(&acl))), (None, None)]
    );
}

#[test]
fn duplicates_and_late_per_listener_settings_are_errors() {
    let f = Fixture::new();
    let pw = f.passwd("pw");
    let acl = f.acl("acl", ACL);
    assert_eq!(
        f.err(&format!(
            "password_file {pw}\nlistener 1883\npassword_file {pw}\n"
        )),
        "FILE:3: key 'password_file': duplicate password_file (already set at FILE:1); \
         mosquitto refuses this too"
    );
    assert!(f
        .err(&format!(
            "per_listener_settings true\nlistener 1883\nacl_file {acl}\nacl_file {acl}\n"
        ))
        .starts_with("FILE:4: key 'acl_file': duplicate acl_file (already set at FILE:3)"));
    for first in [
        format!("password_file {pw}"),
        format!("acl_file {acl}"),
        "check_retain_source false".to_string(),
    ] {
        let e = f.err(&format!(
            "{first}\nlistener 1883\nper_listener_settings true\n"
        ));
        assert!(
            e.starts_with("FILE:3: key 'per_listener_settings': must be set before any")
                && e.contains("(first one at FILE:1)"),
            "{first}: {e}"
        );
    }
}

#[test]
fn bad_files_are_errors_naming_both_lines() {
    let f = Fixture::new();
    let acl = f.acl("acl", "user u\ntopic read a\ntopic rw b\n");
    let e = f.err(&format!("listener 1883\nacl_file {acl}\n"));
    assert_eq!(
        e,
        format!(
            "FILE:2: key 'acl_file': {acl}:3: invalid access type \"rw\" (expected read, write, \
             readwrite or deny)"
        )
    );
    let pw = f.write("pw", "alice:plain\n").display().to_string();
    let e = f.err(&format!("listener 1883\npassword_file {pw}\n"));
    assert!(
        e.starts_with(&format!(
            "FILE:2: key 'password_file': {pw}:1: user \"alice\": the password is not hashed"
        )),
        "{e}"
    );
    let e = f.err("listener 1883\npassword_file /nonexistent/pw\n");
    assert!(
        e.starts_with("FILE:2: key 'password_file': /nonexistent/pw: cannot read password file: "),
        "{e}"
    );
}

#[test]
fn file_warnings_world_readable_and_acl_notes() {
    let f = Fixture::new();
    let pw = f.passwd("pw");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let acl = f.acl("acl", "pattern read fixed/#\n");
    let empty = f.acl("empty", "# nothing\n");
    let c = f.ok(&format!(
        "listener 1883\npassword_file {pw}\nacl_file {acl}\n"
    ));
    let msgs: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("is readable by other users")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains(&format!("{acl}:1: pattern \"fixed/#\" contains neither"))),
        "{msgs:?}"
    );
    let c = f.ok(&format!("listener 1883\nacl_file {empty}\n"));
    assert!(c
        .warnings
        .iter()
        .any(|w| w.message.contains("grants nothing")));
}

#[test]
fn client_ids_bound_to_certificates() {
    let f = Fixture::new();
    let (cert, key, ca) = f.pem();
    let tls = format!("certfile {cert}\nkeyfile {key}\ncafile {ca}\n");
    let c = f.ok(&format!(
        "listener 8883\n{tls}require_certificate true\nuse_identity_as_username true\n\
         require_client_id_match_identity true\n"
    ));
    let b = c.listeners[0].client_id_binding.as_ref().expect("binding");
    assert_eq!(b.rule.pattern(), "%u");
    assert_eq!(b.rule.source(), crate::auth::IdentitySource::CommonName);

    let c = f.ok(&format!(
        "listener 8883\n{tls}require_certificate true\nuse_subject_as_username true\n\
         require_client_id_match_identity true\nclient_id_identity_pattern %u-ota\n"
    ));
    let b = c.listeners[0].client_id_binding.as_ref().expect("binding");
    assert_eq!(b.rule.pattern(), "%u-ota");
    assert_eq!(b.rule.source(), crate::auth::IdentitySource::Subject);
    let rendered = render_effective(&c);
    assert_eq!(normalized(f.ok(&rendered)), normalized(c), "\n{rendered}");

    let e = f.err(&format!(
        "listener 8883\n{tls}require_client_id_match_identity true\n"
    ));
    assert!(
        e.starts_with(
            "FILE:5: key 'require_client_id_match_identity': needs require_certificate true"
        ),
        "{e}"
    );
    assert!(f
        .err("listener 1883\nrequire_client_id_match_identity true\n")
        .contains("needs require_certificate true"));
    let e = f.err(&format!(
        "listener 8883\n{tls}require_certificate true\nrequire_client_id_match_identity true\n\
         client_id_identity_pattern device\n"
    ));
    assert!(
        e.starts_with("FILE:7: key 'client_id_identity_pattern': \"device\" does not contain %u"),
        "{e}"
    );
    let c = ok("listener 1883\nclient_id_identity_pattern %u\nallow_anonymous true\n");
    assert!(has_warning(&c, "client_id_identity_pattern"));
    assert!(c.listeners[0].client_id_binding.is_none());
    assert!(
        ok("listener 1883\nrequire_client_id_match_identity false\nallow_anonymous true\n")
            .listeners[0]
            .client_id_binding
            .is_none()
    );
}
