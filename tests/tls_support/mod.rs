//! In-memory TLS driver for the tls_* integration tests: a rustls client and a Midge server
//! connection exchange records through byte buffers, no sockets.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// Which side failed a handshake.
#[derive(Debug)]
pub enum Failed {
    Server(rustls::Error),
    Client(rustls::Error),
}

impl Failed {
    pub fn server(self) -> rustls::Error {
        match self {
            Failed::Server(e) => e,
            Failed::Client(e) => {
                panic!("expected the server to refuse, but the client failed: {e}")
            }
        }
    }
}

fn pump(from: &mut dyn FnMut(&mut Vec<u8>) -> usize, buf: &mut Vec<u8>) -> usize {
    buf.clear();
    from(buf)
}

/// Runs a full handshake (plus the post-handshake ticket flight) between a new client
/// connection and a new server connection.
pub fn handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> Result<(ServerConnection, ClientConnection), Failed> {
    let mut s = ServerConnection::new(server.clone()).map_err(Failed::Server)?;
    let mut c = ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap())
        .map_err(Failed::Client)?;
    let mut buf = Vec::new();
    for _ in 0..32 {
        let mut moved = 0;
        moved += pump(&mut |b| c.write_tls(b).unwrap(), &mut buf);
        if !buf.is_empty() {
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                if let Err(e) = s.process_new_packets() {
                    return Err(Failed::Server(e));
                }
            }
        }
        moved += pump(&mut |b| s.write_tls(b).unwrap(), &mut buf);
        if !buf.is_empty() {
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                if let Err(e) = c.process_new_packets() {
                    return Err(Failed::Client(e));
                }
            }
        }
        if moved == 0 && !s.is_handshaking() && !c.is_handshaking() {
            return Ok((s, c));
        }
    }
    panic!("handshake did not converge");
}

pub fn load_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
        .map(|c| c.unwrap())
        .collect()
}

pub fn load_key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
}

/// A rustls client trusting `ca`, optionally presenting `cert`/`key`.
pub fn client_config(ca: &Path, cert_key: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    client_config_with(ca, cert_key, rustls::crypto::aws_lc_rs::default_provider())
}

pub fn client_config_with(
    ca: &Path,
    cert_key: Option<(&Path, &Path)>,
    provider: rustls::crypto::CryptoProvider,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca) {
        roots.add(c).unwrap();
    }
    let b = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match cert_key {
        Some((c, k)) => b.with_client_auth_cert(load_certs(c), load_key(k)).unwrap(),
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// Path of the openssl binary, or a clear failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "these tests need the `openssl` command line tool (apt-get install openssl): {e}"
            )
        });
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn openssl_out(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("these tests need the `openssl` command line tool");
    assert!(out.status.success(), "openssl {} failed", args.join(" "));
    String::from_utf8(out.stdout).unwrap()
}
