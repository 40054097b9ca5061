//! Tokens as passwords: a JWT (RFC 7519) in CONNECT's password field, its subject the
//! username, its `permissions` claim rules on top of the configured ACL, its expiry the end
//! of the connection.
//!
//! `[broker.auth.jwt]` names one algorithm and its key: HS256 with a secret file (at least 32
//! bytes, RFC 7518 §3.2), or RS256, ES256 or EdDSA with a public key file (PEM). A token is
//! accepted only when its header names that algorithm (so `none`, or HS256 signed with a
//! public key, never is), its signature checks, it carries `sub` and `exp`, `exp` is ahead
//! (and `nbf`, if present, behind) by the clock with `leeway`, `iss` and `aud` are the
//! configured ones when configured, and every permission is one [`crate::acl::expand`] knows.
//! [`mint`] makes one, for `edgebus token`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::acl::{self, AclRule};

/// `[broker.auth.jwt]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256`, `RS256`, `ES256` or `EdDSA`; a token signed otherwise is refused.
    pub algorithm: JwtAlgorithm,
    /// HS256: the shared secret, a file of at least 32 bytes (trailing whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// RS256, ES256, EdDSA: the public key that verifies (PEM).
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// RS256, ES256, EdDSA: the private key `edgebus token` signs with (PEM, PKCS#8 for
    /// ES256 and EdDSA). The broker never reads it; it may live on another host.
    #[serde(default)]
    pub private_key: Option<PathBuf>,
    /// When set, a token's `iss` must be this.
    #[serde(default)]
    pub issuer: Option<String>,
    /// When set, a token's `aud` must name this.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default, with = "crate::config::duration")]
    pub leeway: Duration,
}

/// A signing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256, a shared secret.
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl JwtAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::ES256 => Algorithm::ES256,
            JwtAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// A key that could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The configuration names no key for the algorithm.
    #[error("{0}")]
    Missing(String),
    /// The key file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The key file holds no usable key.
    #[error("{path}: {reason}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What a token says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Who holds it: the username.
    pub sub: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Permissions (see [`crate::acl::expand`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
}

/// A verified token: who, what it grants, until when.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The subject.
    pub subject: String,
    /// The permissions' rules.
    pub grants: Vec<AclRule>,
    /// When it expires, with the configured leeway.
    pub expires: SystemTime,
}

/// Checks tokens against the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    prefix: String,
    leeway: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|error| KeyError::Io {
        path: path.to_owned(),
        error,
    })
}

fn secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    let mut s = read(path)?;
    while s.last().is_some_and(u8::is_ascii_whitespace) {
        s.pop();
    }
    if s.len() < 32 {
        return Err(KeyError::Bad {
            path: path.to_owned(),
            reason: format!(
                "an HS256 secret must be at least 32 bytes (RFC 7518 §3.2); this one is {} \
                 (make one with `head -c 32 /dev/urandom | base64 > FILE`)",
                s.len()
            ),
        });
    }
    Ok(s)
}

fn bad(path: &Path) -> impl FnOnce(jsonwebtoken::errors::Error) -> KeyError + '_ {
    move |e| KeyError::Bad {
        path: path.to_owned(),
        reason: format!("not a usable PEM key for this algorithm: {e}"),
    }
}

impl Verifier {
    /// Reads the key; `prefix` is the bus's topic prefix, which permissions expand under.
    pub fn load(config: &JwtConfig, prefix: &str) -> Result<Verifier, KeyError> {
        let alg = config.algorithm;
        let key = match alg {
            JwtAlgorithm::HS256 => {
                let path = config.secret_file.as_deref().ok_or_else(|| {
                    KeyError::Missing("HS256 needs `secret_file` in [broker.auth.jwt]".into())
                })?;
                DecodingKey::from_secret(&secret(path)?)
            }
            _ => {
                let path = config.public_key.as_deref().ok_or_else(|| {
                    KeyError::Missing(format!("{alg:?} needs `public_key` in [broker.auth.jwt]"))
                })?;
                let pem = read(path)?;
                match alg {
                    JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                    JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                    _ => DecodingKey::from_ed_pem(&pem),
                }
                .map_err(bad(path))?
            }
        };
        let mut validation = Validation::new(alg.jwt());
        validation.leeway = config.leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Verifier {
            key,
            validation,
            prefix: prefix.to_owned(),
            leeway: config.leeway,
        })
    }

    /// Checks a token; the error says why it is refused.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| describe(&e))?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err("the token's subject is empty".into());
        }
        let mut grants = Vec::new();
        for p in &claims.permissions {
            grants.extend(acl::expand(p, &self.prefix).map_err(|e| format!("permission {e}"))?);
        }
        Ok(Verified {
            subject: claims.sub,
            grants,
            // Accepted until `exp` + leeway, so closed then, not at once.
            expires: UNIX_EPOCH
                .checked_add(Duration::from_secs(
                    claims.exp.saturating_add(self.leeway.as_secs()),
                ))
                .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX))),
        })
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidSignature => "bad signature (signed with another key?)".into(),
        K::InvalidAlgorithm => "signed with another algorithm than the configured one".into(),
        K::InvalidIssuer => "wrong issuer (iss)".into(),
        K::InvalidAudience => "wrong audience (aud)".into(),
        K::MissingRequiredClaim(c) => format!("the token has no `{c}` claim"),
        _ => format!("not a valid token: {e}"),
    }
}

/// Whether a password is shaped like a JWT (three base64url parts, a JSON header), and so is
/// checked as one rather than against the password file.
pub fn looks_like_jwt(password: &[u8]) -> bool {
    password.starts_with(b"eyJ")
        && password.iter().filter(|&&b| b == b'.').count() == 2
        && password
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Mints a token for `subject` with `permissions`, valid for `ttl`, signed with the key
/// `config` names (HS256: `secret_file`; the others: `private_key`, or `private_key`
/// given here). Each permission is checked first.
pub fn mint(
    config: &JwtConfig,
    private_key: Option<&Path>,
    subject: &str,
    permissions: &[String],
    ttl: Duration,
) -> Result<String, String> {
    if subject.is_empty() || subject.contains(['+', '#', '/']) {
        return Err(format!(
            "`{subject}`: a subject is a username (not empty, no `/`, `+` or `#`)"
        ));
    }
    for p in permissions {
        acl::expand(p, "edge").map_err(|e| format!("permission {e}"))?;
    }
    let alg = config.algorithm;
    let key = match alg {
        JwtAlgorithm::HS256 => {
            let path = config
                .secret_file
                .as_deref()
                .ok_or("HS256 needs `secret_file` in [broker.auth.jwt]")?;
            EncodingKey::from_secret(&secret(path).map_err(|e| e.to_string())?)
        }
        _ => {
            let path = private_key
                .or(config.private_key.as_deref())
                .ok_or(format!(
                    "{alg:?} signs with a private key: `--key FILE`, or `private_key` in \
                 [broker.auth.jwt]"
                ))?;
            let pem = read(path).map_err(|e| e.to_string())?;
            match alg {
                JwtAlgorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
                JwtAlgorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                _ => EncodingKey::from_ed_pem(&pem),
            }
            .map_err(|e| bad(path)(e).to_string())?
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: subject.to_owned(),
        exp: now + ttl.as_secs().max(1),
        iat: Some(now),
        nbf: None,
        iss: config.issuer.clone(),
        aud: config.audience.clone(),
        permissions: permissions.to_vec(),
    };
    jsonwebtoken::encode(&Header::new(alg.jwt()), &claims, &key)
        .map_err(|e| format!("cannot sign: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs256(dir: &Path) -> JwtConfig {
        let secret = dir.join("jwt.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").expect("write");
        JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret_file: Some(secret),
            public_key: None,
            private_key: None,
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgebus-token-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn a_minted_token_verifies_with_its_permissions() {
        let cfg = hs256(&tempdir("mint"));
        let token = mint(
            &cfg,
            None,
            "alice",
            &["echo:call".into()],
            Duration::from_secs(60),
        )
        .expect("mint");
        assert!(looks_like_jwt(token.as_bytes()));
        let v = Verifier::load(&cfg, "edge").expect("load").verify(&token);
        let v = v.expect("valid");
        assert_eq!(v.subject, "alice");
        assert!(v.grants.iter().any(|r| r.topic == "edge/echo/+/request"));
    }

    #[test]
    fn refusals_say_why() {
        let dir = tempdir("refuse");
        let cfg = hs256(&dir);
        let verifier = Verifier::load(&cfg, "edge").expect("load");
        // Signed with another secret.
        let other_secret = dir.join("other.secret");
        std::fs::write(&other_secret, "another secret of thirty-two bytes!").expect("write");
        let other = JwtConfig {
            secret_file: Some(other_secret),
            ..cfg.clone()
        };
        let forged = mint(&other, None, "alice", &[], Duration::from_secs(60)).expect("mint");
        assert!(verifier.verify(&forged).unwrap_err().contains("signature"));
        // `alg: none`, unsigned.
        let body = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "alice", "exp": 4_000_000_000u64}),
            &EncodingKey::from_secret(b"x"),
        )
        .expect("encode");
        let payload = body.split('.').nth(1).expect("payload");
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(verifier.verify(&none).is_err());
        // A permission nobody knows.
        let claims =
            serde_json::json!({"sub": "a", "exp": 4_000_000_000u64, "permissions": ["x:fly"]});
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let odd = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).expect("enc");
        assert!(verifier.verify(&odd).unwrap_err().contains("permission"));
        // No expiry.
        let claims = serde_json::json!({"sub": "a"});
        let forever =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).expect("enc");
        assert!(verifier.verify(&forever).unwrap_err().contains("exp"));
    }

    #[test]
    fn short_secrets_are_refused() {
        let dir = tempdir("short");
        let path = dir.join("short.secret");
        std::fs::write(&path, "too short\n").expect("write");
        let cfg = JwtConfig {
            secret_file: Some(path),
            ..hs256(&dir)
        };
        let e = Verifier::load(&cfg, "edge").unwrap_err().to_string();
        assert!(e.contains("at least 32 bytes"), "{e}");
    }
}
