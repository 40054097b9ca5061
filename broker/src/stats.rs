//! Broker counters, and the retained stats record built from them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Instant, SystemTime};

use serde::Serialize;

/// Counters shared by every connection. Relaxed atomics: each is read on its own.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    pub(crate) connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) denied_publish: AtomicU64,
    pub(crate) denied_subscribe: AtomicU64,
    pub(crate) properties_stripped: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) filters: AtomicU64,
    pub(crate) wills: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) slow_subscriber: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) too_large: AtomicU64,
    pub(crate) sessions: AtomicU64,
    pub(crate) retained: AtomicU64,
    pub(crate) persisted_bytes: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            denied_publish: AtomicU64::new(0),
            denied_subscribe: AtomicU64::new(0),
            properties_stripped: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            filters: AtomicU64::new(0),
            wills: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            slow_subscriber: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            retained: AtomicU64::new(0),
            persisted_bytes: AtomicU64::new(0),
        }
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Relaxed);
}

/// A point-in-time copy of the counters: the body of `P/system/broker/stats`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections open now.
    pub connections: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// CONNECTs refused (bad id, auth, limits, protocol version).
    pub refused: u64,
    /// PUBLISH packets accepted from clients.
    pub messages_in: u64,
    /// PUBLISH packets written to clients.
    pub messages_out: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Messages and subscriptions not delivered or refused, by cause.
    pub dropped: Dropped,
    /// Subscriptions held now (bounded by `max_filters`).
    pub filters: u64,
    /// Sessions held now, connected or waiting for their client.
    pub sessions: u64,
    /// Retained messages held now.
    pub retained: u64,
    /// Bytes written to the persistence directory since start (0 with persistence off).
    #[serde(default)]
    pub persisted_bytes: u64,
    /// Last Will messages published.
    pub wills: u64,
    /// Seconds since the broker started.
    pub uptime_s: u64,
    /// Resident memory of the process in bytes (0 where /proc is missing).
    pub rss_bytes: u64,
    /// When this snapshot was taken (RFC 3339).
    pub at: String,
}

/// The `dropped` part of the stats record.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Dropped {
    /// PUBLISHes refused by the ACL.
    pub denied_publish: u64,
    /// Subscriptions refused by the ACL, a bad filter or `max_filters`.
    pub denied_subscribe: u64,
    /// MQTT 5 publishes whose properties were removed for an MQTT 3.1.1 subscriber.
    pub properties_stripped: u64,
    /// Connections closed for a malformed or unexpected packet.
    pub protocol_errors: u64,
    /// PUBLISHes over a client's `rate_limit`.
    pub rate_limited: u64,
    /// Messages not queued for a subscriber: an offline session's queue was full, or the
    /// subscriber took nothing for `slow_subscriber_timeout` while its queue was full (it is
    /// then disconnected). Each episode is logged and published on `{system topic}/lag`.
    pub slow_subscriber: u64,
    /// Messages whose MQTT 5 Message Expiry passed before they could be sent.
    pub expired: u64,
    /// Messages not sent because they exceed the subscriber's Maximum Packet Size.
    pub too_large: u64,
}

impl Stats {
    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        StatsSnapshot {
            connections: g(&self.connections),
            connections_total: g(&self.connections_total),
            refused: g(&self.refused),
            messages_in: g(&self.messages_in),
            messages_out: g(&self.messages_out),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
            dropped: Dropped {
                denied_publish: g(&self.denied_publish),
                denied_subscribe: g(&self.denied_subscribe),
                properties_stripped: g(&self.properties_stripped),
                protocol_errors: g(&self.protocol_errors),
                rate_limited: g(&self.rate_limited),
                slow_subscriber: g(&self.slow_subscriber),
                expired: g(&self.expired),
                too_large: g(&self.too_large),
            },
            filters: g(&self.filters),
            sessions: g(&self.sessions),
            retained: g(&self.retained),
            persisted_bytes: g(&self.persisted_bytes),
            wills: g(&self.wills),
            uptime_s: self.started.elapsed().as_secs(),
            rss_bytes: rss_bytes(),
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// How the heap is trimmed: glibc's `malloc_trim` unless the program's allocator registered
/// its own way ([`set_heap_trimmer`]).
static TRIMMER: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers how to hand freed memory back to the OS, for a program with its own global
/// allocator (the `edgebus` binary uses jemalloc and purges its arenas).
pub fn set_heap_trimmer(trim: fn()) {
    let _ = TRIMMER.set(trim);
}

/// Hands freed heap memory back to the OS, after a burst of connections or messages.
pub(crate) fn trim_heap() {
    match TRIMMER.get() {
        Some(trim) => trim(),
        None => glibc_trim(),
    }
}

/// glibc keeps what a burst allocated long after it is freed; trimming gives it back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn glibc_trim() {
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_trim() {}
