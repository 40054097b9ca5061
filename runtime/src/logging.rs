//! Where log lines go, and how they look.
//!
//! - Under systemd, with stderr connected to the journal (`JOURNAL_STREAM` names it): each event
//!   goes to journald with its fields as journal fields (`SERVICE`, `ENDPOINT`,
//!   `CORRELATION_ID`, `ERROR`, …), so `journalctl CORRELATION_ID=…` follows one request across
//!   services; the journal stamps the time. If journald cannot be reached, plain lines
//!   without a timestamp go to stderr.
//! - Started by systemd with stderr elsewhere: plain lines without a timestamp (the
//!   supervisor stamps them).
//! - On a terminal: timestamped, coloured lines.
//! - Elsewhere (a pipe, a file): timestamped plain lines.
//!
//! `EDGEBUS_LOG_FORMAT=journal|plain|terminal` overrides the choice (`plain`: timestamped,
//! never coloured); `EDGEBUS_LOG` (or `RUST_LOG`) sets the filter, e.g.
//! `EDGEBUS_LOG=debug,rumqttd=off`.
//!
//! A service calls [`crate::init_logging`] once at start (the `edgebus` binary calls
//! [`init`] with its own default filter).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// journald's native protocol, with fields.
    Journal,
    /// Timestamped lines, never coloured.
    Plain,
    /// Plain lines without timestamps: a supervisor (systemd) stamps them.
    Unstamped,
    /// Timestamped lines, coloured on a terminal.
    Terminal,
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM=dev:inode`).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(want) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let want = want.to_string_lossy().into_owned();
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    want == format!("{}:{}", meta.dev(), meta.ino())
}

/// The format for this process: `EDGEBUS_LOG_FORMAT`, else from where stderr goes.
pub fn detect() -> Format {
    match std::env::var("EDGEBUS_LOG_FORMAT").as_deref() {
        Ok("journal") => return Format::Journal,
        Ok("plain") => return Format::Plain,
        Ok("terminal") => return Format::Terminal,
        _ => {}
    }
    if stderr_is_journal() {
        Format::Journal
    } else if std::io::stderr().is_terminal() {
        // A terminal, even one whose shell inherited systemd's variables (a desktop session).
        Format::Terminal
    } else if std::env::var_os("JOURNAL_STREAM").is_some()
        || std::env::var_os("INVOCATION_ID").is_some()
    {
        // Started by systemd, stderr elsewhere: the supervisor still stamps lines.
        Format::Unstamped
    } else {
        Format::Terminal
    }
}

/// Installs the global subscriber; `default` is the filter when neither `EDGEBUS_LOG` nor
/// `RUST_LOG` is set. Journal lines carry the identifier `edgebus`. A second call, or a
/// subscriber already installed, leaves the first in place.
pub fn init(default: &str) {
    let filter = || {
        EnvFilter::try_from_env("EDGEBUS_LOG")
            .or_else(|_| EnvFilter::try_from_default_env())
            .unwrap_or_else(|_| EnvFilter::new(default))
    };
    let mut format = detect();
    let journal = if format == Format::Journal {
        match tracing_journald::layer() {
            Ok(l) => Some(
                l.with_field_prefix(None)
                    .with_syslog_identifier("edgebus".into())
                    // syslog's usual reading: info is 6, debug 7 (`journalctl -p info`).
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        error: tracing_journald::Priority::Error,
                        warn: tracing_journald::Priority::Warning,
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        trace: tracing_journald::Priority::Debug,
                    })
                    .with_filter(filter()),
            ),
            Err(e) => {
                eprintln!("edgebus: journald not reachable ({e}); logging plain lines to stderr");
                format = Format::Unstamped;
                None
            }
        }
    } else {
        None
    };
    let fmt = match format {
        Format::Journal => None,
        Format::Plain => Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter(filter())
                .boxed(),
        ),
        Format::Unstamped => Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .without_time()
                .with_filter(filter())
                .boxed(),
        ),
        Format::Terminal => Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter())
                .boxed(),
        ),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(journal)
        .try_init();
}
