//! The client-certificate identity and mosquitto's rule for turning it into the MQTT username.
//!
//! mosquitto (src/handle_connect.c) with `use_identity_as_username` or
//! `use_subject_as_username` on a TLS listener:
//! - frees the username and password the client sent in CONNECT and never checks them
//!   against the password file: the certificate *is* the authentication;
//! - takes the peer certificate; none → CONNACK "bad user name or password";
//! - `use_identity_as_username`: the first commonName of the subject (none, or one with an
//!   embedded NUL → "bad user name or password"); checked before `use_subject_as_username`,
//!   so it wins when both are set;
//! - `use_subject_as_username`: `X509_NAME_print_ex(…, XN_FLAG_RFC2253)`, i.e. RDNs in
//!   reverse order, `,` between RDNs and `+` inside multi-valued ones, OpenSSL short names,
//!   RFC 2253 escaping, every non-ASCII byte of the UTF-8 form escaped as `\XX`, unknown
//!   attribute types as dotted OID with a `#` hex dump of the DER value.
//!
//! [`format_subject_rfc2253`] reproduces that output byte for byte for the string types
//! certificates use (checked against `openssl x509 -nameopt RFC2253` in the tests).

use std::fmt::Write as _;

use rustls::pki_types::CertificateDer;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};
use x509_parser::x509::AttributeTypeAndValue;

use super::options::TlsOptions;

/// Who the client certificate says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// First commonName of the subject, decoded to text (mosquitto's `use_identity_as_username`).
    pub common_name: Option<String>,
    /// The whole subject as mosquitto's `use_subject_as_username` prints it,
    /// e.g. `CN=device-1,O=Acme,C=GB`.
    pub subject: String,
}

/// Extracts the identity from the peer's chain (leaf first, as
/// `ServerConnection::peer_certificates()` returns it). `None` if there is no certificate or
/// it does not parse (it was verified already, so the latter does not happen in practice).
pub fn client_identity(peer_certs: &[CertificateDer<'_>]) -> Option<ClientIdentity> {
    let leaf = peer_certs.first()?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    let subject = cert.subject();
    let common_name = subject.iter_common_name().next().map(attr_text);
    Some(ClientIdentity {
        common_name,
        subject: format_subject_rfc2253(subject),
    })
}

/// Which username a listener uses (mosquitto precedence: identity, then subject).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernameRule {
    /// Plain listener rule: the username (and password) the client sent.
    FromClient,
    /// `use_identity_as_username`: the certificate's commonName.
    CertificateCommonName,
    /// `use_subject_as_username`: the certificate's RFC 2253 subject.
    CertificateSubject,
}

impl UsernameRule {
    pub fn from_options(opts: &TlsOptions) -> Self {
        if opts.use_identity_as_username {
            Self::CertificateCommonName
        } else if opts.use_subject_as_username {
            Self::CertificateSubject
        } else {
            Self::FromClient
        }
    }
}

/// What the CONNECT handler does with the username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsernameOutcome<'a> {
    /// Use the client's username and check its password as usual (may be `None`: anonymous).
    Client(Option<&'a str>),
    /// Use this username; the client's username and password are ignored and no password
    /// check is made (the verified certificate authenticated the client).
    Certificate(String),
}

/// Why a certificate-identity listener refuses the CONNECT (send CONNACK 0x86 in v5,
/// return code 4 "bad user name or password" in 3.1.1, as mosquitto does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsernameRefused {
    #[error(
        "the listener takes the username from the client certificate, but the client sent none"
    )]
    NoCertificate,
    #[error("the client certificate has no commonName to use as username")]
    NoCommonName,
    #[error("the client certificate's commonName contains a NUL character")]
    NulInCommonName,
}

/// Applies mosquitto's username rule.
pub fn resolve_username<'a>(
    rule: UsernameRule,
    identity: Option<&ClientIdentity>,
    client_username: Option<&'a str>,
) -> Result<UsernameOutcome<'a>, UsernameRefused> {
    match rule {
        UsernameRule::FromClient => Ok(UsernameOutcome::Client(client_username)),
        UsernameRule::CertificateCommonName => {
            let id = identity.ok_or(UsernameRefused::NoCertificate)?;
            let cn = id
                .common_name
                .as_ref()
                .ok_or(UsernameRefused::NoCommonName)?;
            if cn.contains('\0') {
                return Err(UsernameRefused::NulInCommonName);
            }
            Ok(UsernameOutcome::Certificate(cn.clone()))
        }
        UsernameRule::CertificateSubject => {
            let id = identity.ok_or(UsernameRefused::NoCertificate)?;
            Ok(UsernameOutcome::Certificate(id.subject.clone()))
        }
    }
}

/// OpenSSL short names (`OBJ_nid2sn`) for the attribute types found in certificate subjects.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.13" => "description",
        "2.5.4.15" => "businessCategory",
        "2.5.4.16" => "postalAddress",
        "2.5.4.17" => "postalCode",
        "2.5.4.20" => "telephoneNumber",
        "2.5.4.41" => "name",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.45" => "x500UniqueIdentifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "2.5.4.72" => "role",
        "2.5.4.97" => "organizationIdentifier",
        "1.2.840.113549.1.9.1" => "emailAddress",
        "1.2.840.113549.1.9.2" => "unstructuredName",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.3.6.1.4.1.311.60.2.1.1" => "jurisdictionL",
        "1.3.6.1.4.1.311.60.2.1.2" => "jurisdictionST",
        "1.3.6.1.4.1.311.60.2.1.3" => "jurisdictionC",
        _ => return None,
    })
}

/// Decodes an attribute value to Unicode scalar values the way OpenSSL's `do_buf` does;
/// `None` for types OpenSSL dumps as hex.
fn decode_chars(attr: &AttributeTypeAndValue<'_>) -> Option<Vec<u32>> {
    let any = attr.attr_value();
    let data = any.data;
    match any.tag() {
        Tag::Utf8String => Some(match std::str::from_utf8(data) {
            Ok(s) => s.chars().map(u32::from).collect(),
            Err(_) => data.iter().map(|b| u32::from(*b)).collect(),
        }),
        // One byte per character (OpenSSL treats T61 as Latin-1).
        Tag::NumericString
        | Tag::PrintableString
        | Tag::T61String
        | Tag::Ia5String
        | Tag::UtcTime
        | Tag::GeneralizedTime
        | Tag::VisibleString => Some(data.iter().map(|b| u32::from(*b)).collect()),
        Tag::BmpString => Some(
            data.chunks(2)
                .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
                .collect(),
        ),
        Tag::UniversalString => Some(
            data.chunks(4)
                .map(|c| c.iter().fold(0u32, |a, b| a << 8 | u32::from(*b)))
                .collect(),
        ),
        _ => None,
    }
}

fn attr_text(attr: &AttributeTypeAndValue<'_>) -> String {
    match decode_chars(attr) {
        Some(cs) => cs
            .into_iter()
            .map(|c| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
        None => String::from_utf8_lossy(attr.attr_value().data).into_owned(),
    }
}

fn push_hex_der(out: &mut String, attr: &AttributeTypeAndValue<'_>) {
    let any = attr.attr_value();
    let data = any.data;
    let class = any.class() as u8;
    let constructed = if any.header.is_constructed() { 0x20 } else { 0 };
    let tag = any.tag().0;
    out.push('#');
    if tag < 31 {
        let _ = write!(out, "{:02X}", (class << 6) | constructed | tag as u8);
    } else {
        // High tag numbers do not occur in names; keep the dump well-formed anyway.
        let _ = write!(out, "{:02X}", (class << 6) | constructed | 0x1f);
        let mut bytes = Vec::new();
        let mut t = tag;
        bytes.push((t & 0x7f) as u8);
        t >>= 7;
        while t > 0 {
            bytes.push(0x80 | (t & 0x7f) as u8);
            t >>= 7;
        }
        for b in bytes.iter().rev() {
            let _ = write!(out, "{b:02X}");
        }
    }
    let len = data.len();
    if len < 0x80 {
        let _ = write!(out, "{len:02X}");
    } else {
        let lb: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        let _ = write!(out, "{:02X}", 0x80 | lb.len() as u8);
        for b in lb {
            let _ = write!(out, "{b:02X}");
        }
    }
    for b in data {
        let _ = write!(out, "{b:02X}");
    }
}

/// Escapes one value like OpenSSL with `ASN1_STRFLGS_RFC2253`.
fn push_escaped(out: &mut String, chars: &[u32]) {
    let n = chars.len();
    for (i, &c) in chars.iter().enumerate() {
        if c > 0x7f {
            // UTF8_CONVERT then ESC_MSB: each byte of the UTF-8 form as \XX.
            let ch = char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER);
            let mut buf = [0u8; 4];
            for b in ch.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "\\{b:02X}");
            }
            continue;
        }
        let b = c as u8;
        let special = matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';')
            || (i == 0 && (b == b'#' || b == b' '))
            || (i + 1 == n && b == b' ');
        if special {
            out.push('\\');
            out.push(b as char);
        } else if b < 0x20 || b == 0x7f {
            let _ = write!(out, "\\{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

/// Formats a name exactly as `X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253)`.
pub fn format_subject_rfc2253(name: &X509Name<'_>) -> String {
    // Flatten to (rdn index, attribute), then walk backwards (XN_FLAG_DN_REV): OpenSSL
    // reverses entries one by one, so multi-valued RDNs come out reversed as well.
    let entries: Vec<(usize, &AttributeTypeAndValue<'_>)> = name
        .iter_rdn()
        .enumerate()
        .flat_map(|(i, rdn)| rdn.iter().map(move |a| (i, a)))
        .collect();
    let mut out = String::new();
    let mut prev: Option<usize> = None;
    for (set, attr) in entries.iter().rev() {
        if let Some(p) = prev {
            out.push(if p == *set { '+' } else { ',' });
        }
        prev = Some(*set);
        let oid = attr.attr_type().to_id_string();
        match short_name(&oid) {
            Some(sn) => {
                out.push_str(sn);
                out.push('=');
                match decode_chars(attr) {
                    Some(cs) => push_escaped(&mut out, &cs),
                    None => push_hex_der(&mut out, attr),
                }
            }
            None => {
                // XN_FLAG_DUMP_UNKNOWN_FIELDS: unknown type → dotted OID and DER dump.
                out.push_str(&oid);
                out.push('=');
                push_hex_der(&mut out, attr);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(cn: Option<&str>) -> ClientIdentity {
        ClientIdentity {
            common_name: cn.map(str::to_owned),
            subject: "CN=x,O=Acme".into(),
        }
    }

    #[test]
    fn certificate_identity_replaces_client_username() {
        let id = ident(Some("device-1"));
        assert_eq!(
            resolve_username(
                UsernameRule::CertificateCommonName,
                Some(&id),
                Some("mallory")
            ),
            Ok(UsernameOutcome::Certificate("device-1".into()))
        );
        assert_eq!(
            resolve_username(UsernameRule::CertificateSubject, Some(&id), Some("mallory")),
            Ok(UsernameOutcome::Certificate("CN=x,O=Acme".into()))
        );
        assert_eq!(
            resolve_username(UsernameRule::FromClient, Some(&id), Some("alice")),
            Ok(UsernameOutcome::Client(Some("alice")))
        );
    }

    #[test]
    fn certificate_rules_refuse_without_identity() {
        assert_eq!(
            resolve_username(UsernameRule::CertificateCommonName, None, Some("u")),
            Err(UsernameRefused::NoCertificate)
        );
        assert_eq!(
            resolve_username(UsernameRule::CertificateSubject, None, None),
            Err(UsernameRefused::NoCertificate)
        );
        assert_eq!(
            resolve_username(
                UsernameRule::CertificateCommonName,
                Some(&ident(None)),
                None
            ),
            Err(UsernameRefused::NoCommonName)
        );
        assert_eq!(
            resolve_username(
                UsernameRule::CertificateCommonName,
                Some(&ident(Some("a\0b"))),
                None
            ),
            Err(UsernameRefused::NulInCommonName)
        );
    }

    #[test]
    fn identity_wins_over_subject_like_mosquitto() {
        let mut o = TlsOptions::new("c", "k");
        o.use_identity_as_username = true;
        o.use_subject_as_username = true;
        assert_eq!(
            UsernameRule::from_options(&o),
            UsernameRule::CertificateCommonName
        );
    }

    #[test]
    fn escaping_follows_rfc2253_flags() {
        let mut s = String::new();
        push_escaped(
            &mut s,
            &" a,b+c\"d\\e<f>g;h# "
                .chars()
                .map(u32::from)
                .collect::<Vec<_>>(),
        );
        assert_eq!(s, "\\ a\\,b\\+c\\\"d\\\\e\\<f\\>g\\;h#\\ ");
        let mut s = String::new();
        push_escaped(
            &mut s,
            &"#é\u{1}".chars().map(u32::from).collect::<Vec<_>>(),
        );
        assert_eq!(s, "\\#\\C3\\A9\\01");
    }
}
