//! Per-endpoint counters and latency percentiles.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Counters of one endpoint, shared by its request tasks.
#[derive(Debug)]
pub struct EndpointStats {
    requests: AtomicU64,
    errors: AtomicU64,
    inflight: AtomicI64,
    rejected: AtomicU64,
    duplicates: AtomicU64,
    rate_limited: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

/// A snapshot of [`EndpointStats`]: the figures a heartbeat carries.
pub type EndpointSnapshot = edgebus_proto::records::EndpointFigures;

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            inflight: AtomicI64::new(0),
            rejected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            // 1 µs to 10 min at 2 significant digits: a few kilobytes.
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 2).unwrap_or_else(|_| {
                    Histogram::new(2).unwrap_or_else(|_| unreachable!("2 sigfig is valid"))
                }),
            ),
        }
    }
}

impl EndpointStats {
    /// A request started.
    pub fn start(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished after `took`; `ok` says whether it succeeded.
    pub fn finish(&self, took: Duration, ok: bool) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = (took.as_micros() as u64).clamp(1, 600_000_000);
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.record(us);
        }
    }

    /// A request was refused without being handled.
    pub fn reject(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A duplicate was answered from the first copy's reply.
    pub fn duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    /// A request was refused by the endpoint's rate limit (it still finishes as an error).
    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// The handling-time distribution as a cumulative histogram over `bounds` (seconds,
    /// ascending): `(sum in seconds, count, [(bound, requests taking at most bound)])`. The
    /// sum is exact to the histogram's 2 significant digits.
    pub fn latency_histogram(&self, bounds: &[f64]) -> (f64, u64, Vec<(f64, u64)>) {
        let Ok(h) = self.latency.lock() else {
            return (0.0, 0, bounds.iter().map(|b| (*b, 0)).collect());
        };
        let mut buckets: Vec<(f64, u64)> = bounds.iter().map(|b| (*b, 0)).collect();
        let mut sum = 0.0;
        for v in h.iter_recorded() {
            let secs = h.median_equivalent(v.value_iterated_to()) as f64 / 1e6;
            let n = v.count_at_value();
            sum += secs * n as f64;
            for (bound, count) in buckets.iter_mut() {
                if secs <= *bound {
                    *count += n;
                }
            }
        }
        (sum, h.len(), buckets)
    }

    /// The current figures.
    pub fn snapshot(&self) -> EndpointSnapshot {
        let (p50, p99) = match self.latency.lock() {
            Ok(h) if !h.is_empty() => (
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
            ),
            _ => (0.0, 0.0),
        };
        EndpointSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            inflight: self.inflight.load(Ordering::Relaxed).max(0) as u64,
            rejected: self.rejected.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            p50_ms: p50,
            p99_ms: p99,
        }
    }
}
