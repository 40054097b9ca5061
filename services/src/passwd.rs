//! `edgebus passwd FILE USER`: adds or replaces a user in a mosquitto-format password file.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context};

/// Adds `user` with `password` (or one read from the terminal or stdin) to `file`.
pub fn run(file: &Path, user: &str, password: Option<String>) -> anyhow::Result<()> {
    if user.is_empty() || user.contains(':') {
        bail!("a username must be non-empty and may not contain `:`");
    }
    let password = match password {
        Some(p) => p,
        None if std::io::stdin().is_terminal() => {
            let a = rpassword::prompt_password("Password: ").context("reading password")?;
            let b = rpassword::prompt_password("Reenter password: ").context("reading password")?;
            if a != b {
                bail!("passwords do not match");
            }
            a
        }
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        bail!("empty password");
    }
    let existing = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let hash = edgebus_broker::auth::hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("no randomness for a salt: {e}"))?;
    let text = edgebus_broker::auth::upsert_user(&existing, user, &hash);
    write_private(file, &text).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// Writes through a temporary file and a rename: never a half-written file. A new file gets
/// mode 0600; an existing one keeps its owner, group and mode (e.g. root:edgebus 0640, so that
/// the broker's unit can still read it).
fn write_private(file: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let keep = std::fs::metadata(file).ok();
    let tmp = file.with_extension("tmp-edgebus");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    if let Some(m) = keep {
        // Only root may give a file away; for anyone else the owner is already right.
        let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
        f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, file)
}
