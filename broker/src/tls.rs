//! MQTT over TLS (rustls; TLS 1.2 and 1.3 only, ring's ciphers).
//!
//! The handshake runs in the connection's own task, bounded by `connect_timeout`, so a
//! client that stalls it holds up nobody else. The certificate and key are read again on
//! [`Tls::reload`] (SIGHUP, and when either file changes): a new connection gets the new
//! ones, a connection already made keeps going. A reload that fails keeps the old ones and
//! says why.
//!
//! With `client_ca`, every client must present a certificate that chains to it (mTLS).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::{CertificateUsername, TlsConfig};
use crate::Shared;

/// The TLS listener's certificate, key and client CA, as last read.
pub(crate) struct Tls {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// Modification times of the files when last read.
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct TlsError {
    /// The file at fault.
    pub file: String,
    /// What is wrong with it.
    pub message: String,
}

fn err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        file: path.display().to_string(),
        message: message.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(path, e))?;
    if certs.is_empty() {
        return Err(err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// Builds the server configuration from the files.
fn build(files: &TlsConfig) -> Result<ServerConfig, TlsError> {
    // ring, not aws-lc-rs: no cmake or assembler toolchain at build time and a smaller
    // binary on a small host. rustls marks it deprecated for lacking post-quantum key
    // exchange, which MQTT clients do not offer yet.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| err(&files.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(&files.cert, e))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| err(&files.key, format!("does not go with the certificate: {e}")))
}

fn stamps(files: &TlsConfig) -> Vec<Option<SystemTime>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

impl Tls {
    /// Reads the files; an error names the file and what is wrong.
    pub fn load(files: &TlsConfig) -> Result<Tls, TlsError> {
        let config = build(files)?;
        Ok(Tls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps(files)),
        })
    }

    /// Reads the files again; the next handshakes use them. On failure the ones before stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&self.files);
        info!(cert = %self.files.cert.display(), "TLS certificate and key read again");
        Ok(())
    }

    /// Reloads when a file's modification time changed since it was last read.
    pub fn reload_if_changed(&self) {
        let now = stamps(&self.files);
        let changed = *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != now;
        if changed {
            if let Err(e) = self.reload() {
                // Said once per change: the stamps move on, the old certificate stays.
                *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = now;
                warn!(error = %e, "TLS files changed but cannot be used; keeping the ones before");
            }
        }
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Completes the TLS handshake (within `connect_timeout`), then serves MQTT over it, or
/// over a WebSocket over it (`websocket`).
pub(crate) async fn serve(
    stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    shared: Arc<Shared>,
    websocket: bool,
) {
    let Some(tls) = shared.tls.as_ref() else {
        return;
    };
    let accept = tls.acceptor().accept(stream);
    match tokio::time::timeout(shared.config.connect_timeout, accept).await {
        Ok(Ok(stream)) => {
            // The handshake checked the certificate against `client_ca`; its name is the login.
            let login = match tls.files.certificate_username {
                Some(which) => {
                    let name = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| certificate_name(c, which));
                    match name {
                        Some(n) => Some(n),
                        None => {
                            info!(%peer, ?which, "the client certificate has no such name; closing");
                            return;
                        }
                    }
                }
                None => None,
            };
            if websocket {
                crate::ws::serve(stream, local, peer, shared, login).await
            } else {
                crate::connection::serve(stream, local, peer, shared, login).await
            }
        }
        Ok(Err(e)) => info!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => debug!(%peer, "no TLS handshake within {:?}", shared.config.connect_timeout),
    }
}

/// The username a client certificate stands for: its subject's common name, or its first
/// DNS subject alternative name.
pub(crate) fn certificate_name(
    cert: &CertificateDer<'_>,
    which: CertificateUsername,
) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let name = match which {
        CertificateUsername::San => cert.valid_dns_names().next()?.to_owned(),
        CertificateUsername::Cn => common_name(cert.subject())?,
    };
    // A username is one topic level (ACL patterns substitute it).
    (!name.is_empty() && !name.contains(['/', '+', '#', '\0'])).then_some(name)
}

/// The common name in a subject's DER (without its outer SEQUENCE header).
fn common_name(subject: &[u8]) -> Option<String> {
    use simple_asn1::{oid, ASN1Block};
    let mut der = vec![0x30];
    match subject.len() {
        n @ 0..=127 => der.push(n as u8),
        n @ 128..=255 => der.extend([0x81, n as u8]),
        n => der.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    der.extend_from_slice(subject);
    let blocks = simple_asn1::from_der(&der).ok()?;
    let Some(ASN1Block::Sequence(_, sets)) = blocks.first() else {
        return None;
    };
    let cn = oid!(2, 5, 4, 3);
    sets.iter()
        .filter_map(|set| match set {
            ASN1Block::Set(_, pairs) => Some(pairs),
            _ => None,
        })
        .flatten()
        .find_map(|pair| match pair {
            ASN1Block::Sequence(_, v) => match v.as_slice() {
                [ASN1Block::ObjectIdentifier(_, id), ASN1Block::UTF8String(_, s)
                | ASN1Block::PrintableString(_, s)
                | ASN1Block::IA5String(_, s)]
                    if *id == cn =>
                {
                    Some(s.clone())
                }
                _ => None,
            },
            _ => None,
        })
}
