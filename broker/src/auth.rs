//! Password files in mosquitto's format.
//!
//! One `user:hash` per line. Hashes are `$7$iterations$salt$hash` (PBKDF2-HMAC-SHA512, what
//! mosquitto 2 writes) or `$6$salt$hash` (salted SHA-512, what mosquitto 1.x wrote), salt and
//! hash in base64. Files written by `mosquitto_passwd` work unchanged, and [`hash_password`]
//! writes the `$7$` form.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha512};

/// Iterations mosquitto_passwd uses for `$7$` hashes.
pub const PBKDF2_ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;

/// A password file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    /// The file could not be opened or read.
    #[error("password file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said (not a `source`: it is part of this message, said once).
        error: std::io::Error,
    },
    /// A line is not `user:hash` with a known hash format.
    #[error("{path}:{line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Clone)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// The users of a password file. `Debug` never shows a hash.
#[derive(Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish()
    }
}

impl PasswordFile {
    /// Reads and parses a password file.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|error| PasswordFileError::Io {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text).map_err(|(line, reason)| PasswordFileError::Line {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    /// Parses password file text; an error carries the 1-based line number.
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| (i + 1, "expected `user:hash`".to_owned()))?;
            let hash = parse_hash(hash).map_err(|e| (i + 1, format!("user `{user}`: {e}")))?;
            users.insert(user.to_owned(), hash);
        }
        Ok(PasswordFile { users })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when the file names no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks a username and password. Unknown users cost as much as known ones.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(h) => check(h, password),
            None => {
                let dummy = Hash::Pbkdf2 {
                    iterations: PBKDF2_ITERATIONS,
                    salt: vec![0; SALT_LEN],
                    hash: vec![0; 64],
                };
                check(&dummy, password);
                false
            }
        }
    }
}

fn parse_hash(s: &str) -> Result<Hash, String> {
    let parts: Vec<&str> = s.split('$').collect();
    let b64 = |p: &str, what: &str| B64.decode(p).map_err(|e| format!("bad base64 {what}: {e}"));
    match parts.as_slice() {
        ["", "7", iters, salt, hash] => Ok(Hash::Pbkdf2 {
            iterations: iters
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("bad iteration count `{iters}`"))?,
            salt: b64(salt, "salt")?,
            hash: b64(hash, "hash")?,
        }),
        ["", "6", salt, hash] => Ok(Hash::Sha512 {
            salt: b64(salt, "salt")?,
            hash: b64(hash, "hash")?,
        }),
        _ => Err("unknown hash format (expected `$7$…` or `$6$…`; plain-text passwords are not accepted)".into()),
    }
}

fn check(h: &Hash, password: &[u8]) -> bool {
    match h {
        Hash::Pbkdf2 {
            iterations,
            salt,
            hash,
        } => {
            let mut out = vec![0u8; hash.len().max(1)];
            pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
            constant_time_eq(&out, hash)
        }
        Hash::Sha512 { salt, hash } => {
            let mut d = Sha512::new();
            d.update(password);
            d.update(salt);
            constant_time_eq(&d.finalize(), hash)
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hashes a password the way `mosquitto_passwd` does (`$7$101$salt$hash`).
pub fn hash_password(password: &[u8]) -> Result<String, getrandom::Error> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::getrandom(&mut salt)?;
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, PBKDF2_ITERATIONS, &mut out);
    Ok(format!(
        "$7${PBKDF2_ITERATIONS}${}${}",
        B64.encode(salt),
        B64.encode(out)
    ))
}

/// Adds or replaces `user` in the password file text, keeping every other line as it was.
pub fn upsert_user(text: &str, user: &str, hash: &str) -> String {
    let mut out = String::new();
    let mut replaced = false;
    for line in text.lines() {
        if line.split_once(':').is_some_and(|(u, _)| u == user) && !line.starts_with('#') {
            if !replaced {
                out.push_str(&format!("{user}:{hash}\n"));
                replaced = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !replaced {
        out.push_str(&format!("{user}:{hash}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password(b"s3cret").expect("random");
        let file = PasswordFile::parse(&format!("# users\nalice:{h}\n")).expect("parse");
        assert!(file.verify("alice", b"s3cret"));
        assert!(!file.verify("alice", b"wrong"));
        assert!(!file.verify("bob", b"s3cret"));
    }

    #[test]
    fn mosquitto_sha512_format() {
        // $6$: base64(sha512(password || salt)).
        let salt = b"0123456789ab";
        let mut d = Sha512::new();
        d.update(b"pw");
        d.update(salt);
        let line = format!("u:$6${}${}", B64.encode(salt), B64.encode(d.finalize()));
        let file = PasswordFile::parse(&line).expect("parse");
        assert!(file.verify("u", b"pw"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        let err = PasswordFile::parse("a:$7$101$AAAA$AAAA\nbob:plaintext\n").unwrap_err();
        assert_eq!(err.0, 2);
        assert!(err.1.contains("bob"));
    }

    #[test]
    fn upsert_replaces_in_place() {
        let t = upsert_user("a:1\nb:2\n", "a", "9");
        assert_eq!(t, "a:9\nb:2\n");
        assert_eq!(upsert_user("a:1\n", "c", "3"), "a:1\nc:3\n");
    }
}
