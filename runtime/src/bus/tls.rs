//! The broker address, and TLS to the broker (`mqtts://host:port`).
//!
//! `host:port` and `mqtt://host[:port]` are plain MQTT (1883 by default); `mqtts://host[:port]`
//! is MQTT over TLS (8883 by default), TLS 1.2 or 1.3, the server's certificate checked
//! against `ca_file` (else the system's trusted CAs) and its name against `host`. A client
//! certificate and key, when given, answer a broker that asks for one (mTLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// The files TLS to the broker uses; all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificates (PEM) the broker's certificate must chain to; none: the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM), for a broker that asks for one.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// MQTT over TLS.
    pub tls: bool,
}

impl BrokerAddress {
    /// Parses `host:port`, `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub fn parse(s: &str) -> Option<BrokerAddress> {
        let (rest, tls, default) = if let Some(r) = s.strip_prefix("mqtts://") {
            (r, true, 8883)
        } else if let Some(r) = s.strip_prefix("mqtt://") {
            (r, false, 1883)
        } else {
            let (host, port) = super::split_host_port(s)?;
            return Some(BrokerAddress {
                host,
                port,
                tls: false,
            });
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match super::split_host_port(rest) {
            Some(hp) if !rest.ends_with(']') => hp,
            _ => (
                rest.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
                default,
            ),
        };
        if host.is_empty() || host.contains('/') {
            return None;
        }
        Some(BrokerAddress { host, port, tls })
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    if certs.is_empty() {
        return Err(fail(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// The client's TLS configuration from the files `options` names; the error names the
/// file at fault.
pub fn client_config(options: &TlsOptions) -> Result<Arc<ClientConfig>, String> {
    // ring, as the broker: no cmake or assembler at build time, a smaller binary.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &options.ca_file {
        Some(ca) => {
            for c in certs(ca)? {
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no trusted CA certificates on this system; set [bus] ca_file \
                            (or EDGEBUS_CA_FILE)"
                        .into(),
                );
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert)?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{}: {e}", cert.display()))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("a client certificate needs both `cert` and `key`".into()),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a = |s: &str| BrokerAddress::parse(s).map(|a| (a.host, a.port, a.tls));
        assert_eq!(a("127.0.0.1:1883"), Some(("127.0.0.1".into(), 1883, false)));
        assert_eq!(a("mqtt://pi.local"), Some(("pi.local".into(), 1883, false)));
        assert_eq!(a("mqtts://pi.local"), Some(("pi.local".into(), 8883, true)));
        assert_eq!(
            a("mqtts://pi.local:9883"),
            Some(("pi.local".into(), 9883, true))
        );
        assert_eq!(a("mqtts://[::1]:8883"), Some(("::1".into(), 8883, true)));
        assert_eq!(a("mqtts://[::1]"), Some(("::1".into(), 8883, true)));
        assert_eq!(a("pi.local"), None);
        assert_eq!(a("mqtts://"), None);
        assert_eq!(a("mqtts://a/b"), None);
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let e = client_config(&TlsOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
