//! Certificate-bound client ids: `require_client_id_match_identity true` (a Midge key).
//!
//! Owns: deciding whether a CONNECT's client id is the one its verified client certificate
//! allows. Must not touch: certificate parsing (the `tls` module extracts the common name and
//! the RFC 2253 subject, exactly as mosquitto's `use_identity_as_username` /
//! `use_subject_as_username` see them, and hands them over as strings).
//!
//! mosquitto has no such rule: any device with a valid certificate may connect with another
//! device's client id, take over its session and receive what was queued for it. With this
//! key on, the client id must be the certificate identity:
//!
//! * the certificate's first commonName, or, when the listener has `use_subject_as_username
//!   true` (and not `use_identity_as_username`), its whole subject as mosquitto prints it
//!   (`CN=device-1,O=Acme`);
//! * optionally through `client_id_identity_pattern PATTERN`, where `%u` stands for that
//!   identity and everything else is literal: with `client_id_identity_pattern %u-ota` the
//!   device `CN=device-1` must connect as `device-1-ota`. PATTERN contains `%u` exactly once;
//!   the default is `%u` (the client id is the identity).
//!
//! With the rule on, `%c` in an ACL `pattern` is as trustworthy as `%u`
//! (`pattern readwrite devices/%c/#` gives each device its own tree). A client that sends an
//! empty client id is refused (Midge would otherwise assign one that cannot match).

/// Which certificate field is the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// The first commonName (the default, and with `use_identity_as_username`).
    CommonName,
    /// The RFC 2253 subject (with `use_subject_as_username` alone).
    Subject,
}

/// What the TLS layer knows about the client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertIdentity<'a> {
    pub common_name: Option<&'a str>,
    pub subject: &'a str,
}

/// Why a client id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdMismatch {
    #[error("the listener binds client ids to certificates, but the client sent no certificate")]
    NoCertificate,
    #[error("the client certificate has no commonName to bind the client id to")]
    NoCommonName,
    #[error("the client id is not the one the client certificate allows")]
    Differs,
}

/// The `require_client_id_match_identity` rule of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdRule {
    source: IdentitySource,
    prefix: Box<str>,
    suffix: Box<str>,
}

/// The default `client_id_identity_pattern`.
pub const DEFAULT_PATTERN: &str = "%u";

impl ClientIdRule {
    /// `pattern`: `client_id_identity_pattern`, `None` for the default `%u`. The error says why
    /// the pattern is refused.
    pub fn new(source: IdentitySource, pattern: Option<&str>) -> Result<ClientIdRule, String> {
        let pattern = pattern.unwrap_or(DEFAULT_PATTERN);
        let (prefix, suffix) = pattern
            .split_once("%u")
            .ok_or_else(|| format!("{pattern:?} does not contain %u (the certificate identity)"))?;
        if suffix.contains("%u") {
            return Err(format!("{pattern:?} contains %u more than once"));
        }
        if pattern.contains(['+', '#', '/']) {
            return Err(format!(
                "{pattern:?} contains '+', '#' or '/': client ids built from it could not be used \
                 in ACL patterns"
            ));
        }
        Ok(ClientIdRule {
            source,
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }

    pub fn source(&self) -> IdentitySource {
        self.source
    }

    /// The pattern as configured (for `--check-config`).
    pub fn pattern(&self) -> String {
        format!("{}%u{}", self.prefix, self.suffix)
    }

    /// May a client with this certificate identity use `client_id`?
    pub fn check(
        &self,
        client_id: &str,
        identity: Option<CertIdentity<'_>>,
    ) -> Result<(), IdMismatch> {
        let id = identity.ok_or(IdMismatch::NoCertificate)?;
        let want = match self.source {
            IdentitySource::CommonName => id.common_name.ok_or(IdMismatch::NoCommonName)?,
            IdentitySource::Subject => id.subject,
        };
        let matches = client_id
            .strip_prefix(&*self.prefix)
            .and_then(|r| r.strip_suffix(&*self.suffix))
            .is_some_and(|middle| middle == want);
        if matches && !want.is_empty() {
            Ok(())
        } else {
            Err(IdMismatch::Differs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV1: CertIdentity<'static> = CertIdentity {
        common_name: Some("device-1"),
        subject: "CN=device-1,O=Acme",
    };

    #[test]
    fn the_client_id_must_be_the_common_name() {
        let r = ClientIdRule::new(IdentitySource::CommonName, None).unwrap();
        assert_eq!(r.check("device-1", Some(DEV1)), Ok(()));
        assert_eq!(r.check("device-2", Some(DEV1)), Err(IdMismatch::Differs));
        assert_eq!(r.check("device-1 ", Some(DEV1)), Err(IdMismatch::Differs));
        assert_eq!(r.check("Device-1", Some(DEV1)), Err(IdMismatch::Differs));
        assert_eq!(r.check("", Some(DEV1)), Err(IdMismatch::Differs));
        assert_eq!(r.check("device-1", None), Err(IdMismatch::NoCertificate));
        let no_cn = CertIdentity {
            common_name: None,
            subject: "O=Acme",
        };
        assert_eq!(
            r.check("O=Acme", Some(no_cn)),
            Err(IdMismatch::NoCommonName)
        );
        assert_eq!(r.pattern(), "%u");
    }

    #[test]
    fn or_the_subject_with_use_subject_as_username() {
        let r = ClientIdRule::new(IdentitySource::Subject, None).unwrap();
        assert_eq!(r.check("CN=device-1,O=Acme", Some(DEV1)), Ok(()));
        assert_eq!(r.check("device-1", Some(DEV1)), Err(IdMismatch::Differs));
    }

    #[test]
    fn a_pattern_puts_text_around_the_identity() {
        let r = ClientIdRule::new(IdentitySource::CommonName, Some("fleet1-%u-ota")).unwrap();
        assert_eq!(r.check("fleet1-device-1-ota", Some(DEV1)), Ok(()));
        assert_eq!(
            r.check("fleet1-device-1", Some(DEV1)),
            Err(IdMismatch::Differs)
        );
        assert_eq!(
            r.check("device-1-ota", Some(DEV1)),
            Err(IdMismatch::Differs)
        );
        assert_eq!(r.check("fleet1--ota", Some(DEV1)), Err(IdMismatch::Differs));
        assert_eq!(r.pattern(), "fleet1-%u-ota");
        let empty_cn = CertIdentity {
            common_name: Some(""),
            subject: "CN=",
        };
        assert_eq!(
            r.check("fleet1--ota", Some(empty_cn)),
            Err(IdMismatch::Differs)
        );
    }

    #[test]
    fn bad_patterns_are_refused() {
        for (p, why) in [
            ("device", "does not contain %u"),
            ("%u-%u", "more than once"),
            ("%u/x", "contains '+', '#' or '/'"),
            ("%u+", "contains '+', '#' or '/'"),
        ] {
            let e = ClientIdRule::new(IdentitySource::CommonName, Some(p)).unwrap_err();
            assert!(e.contains(why), "{p}: {e}");
        }
    }
}
