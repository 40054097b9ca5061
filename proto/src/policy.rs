//! Resilience policies, as declared in topics.toml and shared by the runtime and the broker:
//! retries with backoff, circuit breakers, and token-bucket rate limits.
//!
//! ```toml
//! [[service.endpoint]]
//! name = "put"
//! retry = { max_attempts = 3, initial_delay = "50ms" }        # callers retry
//! circuit = { failure_threshold = 5, reset_timeout = "2s" }   # callers fail fast
//! rate_limit = "500/s"                                        # each instance admits
//! ```
//!
//! Everything here is plain state with no I/O, so it is tested alone and the broker can use the
//! rate limiter without the MQTT client.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wire::code;

/// A random `u64` from the standard library's per-process hasher keys (jitter, not secrets).
fn jitter_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// When and how often a failed call is tried again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all (1: no retry).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "crate::config::duration")]
    pub initial_delay: Duration,
    /// Largest delay between attempts.
    #[serde(with = "crate::config::duration")]
    pub max_delay: Duration,
    /// Growth of the delay per attempt.
    pub multiplier: f64,
    /// Random spread of each delay, as a fraction (0.25: ±25 %).
    pub jitter: f64,
    /// Error codes worth another attempt; empty: the codes the contract calls retryable
    /// (`TIMEOUT`, `NO_RESPONDERS`, `SERVICE_UNAVAILABLE`, `CIRCUIT_OPEN`, `RATE_LIMITED`).
    pub retry_on: Vec<String>,
    /// How long one attempt waits for its reply before the request is sent again (same
    /// correlation data, so a responder that already ran it re-sends its reply); `None`: the
    /// request's timeout split evenly over the attempts.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::config::opt_duration"
    )]
    pub attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.25,
            retry_on: Vec::new(),
            attempt_timeout: None,
        }
    }
}

impl RetryPolicy {
    /// `retries` retries (so `retries + 1` attempts), the rest default.
    pub fn retries(retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: retries.saturating_add(1),
            ..RetryPolicy::default()
        }
    }

    /// Whether an error with this code is worth another attempt.
    pub fn retries_code(&self, error_code: &str) -> bool {
        if self.retry_on.is_empty() {
            code::retryable(error_code)
        } else {
            self.retry_on.iter().any(|c| c == error_code)
        }
    }

    /// After attempt `attempt` failed with `error_code`: the delay before the next attempt,
    /// or `None` when the policy gives up (attempts used up, or an error it does not retry).
    pub fn retry_after(&self, attempt: u32, error_code: &str) -> Option<Duration> {
        (attempt < self.max_attempts && self.retries_code(error_code)).then(|| self.delay(attempt))
    }

    /// The delay before attempt `attempt + 1` (after `attempt` failed), with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial_delay.as_secs_f64()
            * self
                .multiplier
                .max(1.0)
                .powi(attempt.saturating_sub(1) as i32);
        let base = base.min(self.max_delay.as_secs_f64());
        let spread = self.jitter.clamp(0.0, 1.0);
        let r = (jitter_u64() % 10_000) as f64 / 10_000.0; // [0, 1)
        Duration::from_secs_f64((base * (1.0 + spread * (2.0 * r - 1.0))).max(0.0))
    }

    /// How long each attempt of a request with `timeout` in all waits for its reply.
    pub fn attempt_timeout(&self, timeout: Duration) -> Duration {
        self.attempt_timeout
            .unwrap_or_else(|| timeout / self.max_attempts.max(1))
            .min(timeout)
    }

    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_attempts == 0 {
            return Err(("max_attempts", "must be at least 1".into()));
        }
        if !(self.multiplier >= 1.0 && self.multiplier <= 100.0) {
            return Err(("multiplier", "must be between 1 and 100".into()));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(("jitter", "must be between 0 and 1".into()));
        }
        if self.max_delay < self.initial_delay {
            return Err(("max_delay", "must be at least initial_delay".into()));
        }
        if self.attempt_timeout.is_some_and(|t| t.is_zero()) {
            return Err(("attempt_timeout", "must be more than 0".into()));
        }
        for c in &self.retry_on {
            if c.is_empty() || !c.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                return Err(("retry_on", format!("`{c}` is not an error code")));
            }
        }
        Ok(())
    }
}

/// Settings of a circuit breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// Successful trial calls in half-open that close it again.
    pub success_threshold: u32,
    /// How long it stays open before trial calls are let through.
    #[serde(with = "crate::config::duration")]
    pub reset_timeout: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            failure_threshold: 5,
            success_threshold: 1,
            reset_timeout: Duration::from_secs(5),
        }
    }
}

impl CircuitConfig {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.failure_threshold == 0 {
            return Err(("failure_threshold", "must be at least 1".into()));
        }
        if self.success_threshold == 0 {
            return Err(("success_threshold", "must be at least 1".into()));
        }
        if self.reset_timeout.is_zero() {
            return Err(("reset_timeout", "must be more than 0".into()));
        }
        Ok(())
    }
}

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail at once with `CIRCUIT_OPEN`.
    Open,
    /// A few trial calls go through; their outcome closes or re-opens the circuit.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a call that failed with `error_code` counts against the target's circuit: the
/// target is unreachable, overloaded or broken, as opposed to the request being wrong.
pub fn counts_as_failure(error_code: &str) -> bool {
    matches!(
        error_code,
        code::TIMEOUT | code::NO_RESPONDERS | code::SERVICE_UNAVAILABLE | code::INTERNAL_ERROR
    )
}

#[derive(Debug)]
struct Breaker {
    state: CircuitState,
    failures: u32,
    successes: u32,
    trials: u32,
    opened_at: Option<Instant>,
    rejected: u64,
    opened: u64,
}

/// A circuit breaker for one target: closed → open after `failure_threshold` consecutive
/// failures, open → half-open after `reset_timeout`, half-open → closed after
/// `success_threshold` successful trials (or back to open at the first failed one).
#[derive(Debug)]
pub struct CircuitBreaker {
    config: CircuitConfig,
    state: Mutex<Breaker>,
}

/// A change of a breaker's state, for the caller to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: CircuitState,
    /// The state after.
    pub to: CircuitState,
}

/// What a breaker says about a call about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead (a trial call when the transition says half-open).
    Allowed(Option<Transition>),
    /// Fail at once; the circuit may be tried again after this long.
    Rejected(Duration),
}

/// A snapshot of a breaker, for stats and heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CircuitSnapshot {
    /// Current state.
    pub state: CircuitState,
    /// Consecutive failures counted while closed.
    pub failures: u32,
    /// Times it opened.
    pub opened: u64,
    /// Calls refused with `CIRCUIT_OPEN`.
    pub rejected: u64,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: CircuitConfig) -> CircuitBreaker {
        CircuitBreaker {
            config,
            state: Mutex::new(Breaker {
                state: CircuitState::Closed,
                failures: 0,
                successes: 0,
                trials: 0,
                opened_at: None,
                rejected: 0,
                opened: 0,
            }),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &CircuitConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks to make a call now.
    pub fn admit(&self) -> Admission {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Admission {
        let mut b = self.lock();
        match b.state {
            CircuitState::Closed => Admission::Allowed(None),
            CircuitState::Open => {
                let opened = b.opened_at.unwrap_or(now);
                let open_for = now.saturating_duration_since(opened);
                if open_for >= self.config.reset_timeout {
                    b.state = CircuitState::HalfOpen;
                    b.successes = 0;
                    b.trials = 1;
                    Admission::Allowed(Some(Transition {
                        from: CircuitState::Open,
                        to: CircuitState::HalfOpen,
                    }))
                } else {
                    b.rejected += 1;
                    Admission::Rejected(self.config.reset_timeout - open_for)
                }
            }
            CircuitState::HalfOpen => {
                // As many trials at once as successes are needed to close.
                if b.trials < self.config.success_threshold {
                    b.trials += 1;
                    Admission::Allowed(None)
                } else {
                    b.rejected += 1;
                    Admission::Rejected(Duration::ZERO)
                }
            }
        }
    }

    /// Records the outcome of an admitted call.
    pub fn record(&self, ok: bool) -> Option<Transition> {
        self.record_at(ok, Instant::now())
    }

    fn record_at(&self, ok: bool, now: Instant) -> Option<Transition> {
        let mut b = self.lock();
        let from = b.state;
        match (b.state, ok) {
            (CircuitState::Closed, true) => b.failures = 0,
            (CircuitState::Closed, false) => {
                b.failures += 1;
                if b.failures >= self.config.failure_threshold {
                    Self::open(&mut b, now);
                }
            }
            (CircuitState::HalfOpen, true) => {
                b.successes += 1;
                b.trials = b.trials.saturating_sub(1);
                if b.successes >= self.config.success_threshold {
                    b.state = CircuitState::Closed;
                    b.failures = 0;
                    b.trials = 0;
                }
            }
            (CircuitState::HalfOpen, false) => Self::open(&mut b, now),
            // A call admitted before the circuit opened finished late: nothing to learn.
            (CircuitState::Open, _) => {}
        }
        (b.state != from).then_some(Transition { from, to: b.state })
    }

    fn open(b: &mut Breaker, now: Instant) {
        b.state = CircuitState::Open;
        b.opened_at = Some(now);
        b.opened += 1;
        b.failures = 0;
        b.successes = 0;
        b.trials = 0;
    }

    /// The current state and counters.
    pub fn snapshot(&self) -> CircuitSnapshot {
        let b = self.lock();
        CircuitSnapshot {
            state: b.state,
            failures: b.failures,
            opened: b.opened,
            rejected: b.rejected,
        }
    }
}

/// A rate: `count` per `per`, written `"100/s"`, `"20/min"`, `"1MiB/s"` for bytes, or
/// `"100/s burst 200"` with a burst bigger than one second's worth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens held (the largest burst).
    pub burst: f64,
}

impl Rate {
    /// `per_second` tokens per second, with a burst of one second's worth (at least 1).
    pub fn per_second(per_second: f64) -> Rate {
        Rate {
            per_second,
            burst: per_second.max(1.0),
        }
    }

    /// Parses `"100/s"`, `"20/min"`, `"5/100ms"`, `"64KiB/s"`, optionally followed by
    /// `" burst N"`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || {
            format!(
                "`{s}` is not a rate; write e.g. \"100/s\", \"20/min\", \"1MiB/s\" or \"100/s burst 300\""
            )
        };
        let (rate, burst) = match s.split_once(" burst ") {
            Some((r, b)) => (r.trim(), Some(b.trim())),
            None => (s.trim(), None),
        };
        let (count, per) = rate.split_once('/').ok_or_else(bad)?;
        let count = parse_count(count.trim()).ok_or_else(bad)?;
        let per = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "m" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if per.is_zero() || count <= 0.0 {
            return Err(format!(
                "`{s}`: the count and the period must be more than 0"
            ));
        }
        let per_second = count / per.as_secs_f64();
        let burst = match burst {
            Some(b) => parse_count(b).filter(|b| *b >= 1.0).ok_or_else(bad)?,
            None => count.max(per_second).max(1.0),
        };
        Ok(Rate { per_second, burst })
    }
}

fn parse_count(s: &str) -> Option<f64> {
    if let Ok(n) = s.parse::<f64>() {
        return n.is_finite().then_some(n);
    }
    crate::config::ByteSize::parse(s).ok().map(|b| b.0 as f64)
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s burst {}", self.per_second, self.burst)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A token bucket: starts full, refills at `rate.per_second`, holds at most `rate.burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate.burst,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens if there are that many now.
    pub fn try_take(&mut self, n: f64) -> bool {
        self.try_take_at(n, Instant::now())
    }

    fn try_take_at(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        // One message larger than the whole burst still passes once the bucket is full.
        let n = n.min(self.rate.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Whether `n` tokens are there now (refilled first), without taking them.
    pub fn has(&mut self, n: f64) -> bool {
        self.has_at(n, Instant::now())
    }

    fn has_at(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= n.min(self.rate.burst)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate.per_second).min(self.rate.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let b = CircuitBreaker::new(CircuitConfig {
            failure_threshold: 3,
            success_threshold: 2,
            reset_timeout: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        assert_eq!(b.record_at(false, t0), None);
        assert_eq!(b.record_at(true, t0), None, "a success resets the count");
        b.record_at(false, t0);
        b.record_at(false, t0);
        let open = b.record_at(false, t0).expect("third failure opens");
        assert_eq!(open.to, CircuitState::Open);
        assert!(matches!(b.admit_at(t0), Admission::Rejected(d) if d == Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            b.admit_at(t1),
            Admission::Allowed(Some(Transition {
                from: CircuitState::Open,
                to: CircuitState::HalfOpen
            }))
        );
        assert_eq!(b.admit_at(t1), Admission::Allowed(None), "second trial");
        assert!(matches!(b.admit_at(t1), Admission::Rejected(_)), "no third");
        assert_eq!(b.record_at(true, t1), None);
        assert_eq!(
            b.record_at(true, t1).map(|t| t.to),
            Some(CircuitState::Closed)
        );
        let s = b.snapshot();
        assert_eq!(
            (s.state, s.opened, s.rejected),
            (CircuitState::Closed, 1, 2)
        );
    }

    #[test]
    fn failed_trial_reopens() {
        let b = CircuitBreaker::new(CircuitConfig {
            failure_threshold: 1,
            ..CircuitConfig::default()
        });
        let t0 = Instant::now();
        b.record_at(false, t0);
        let t1 = t0 + Duration::from_secs(5);
        assert!(matches!(b.admit_at(t1), Admission::Allowed(Some(_))));
        assert_eq!(
            b.record_at(false, t1).map(|t| t.to),
            Some(CircuitState::Open)
        );
        assert!(matches!(b.admit_at(t1), Admission::Rejected(_)));
    }

    #[test]
    fn rates_parse() {
        assert_eq!(Rate::parse("100/s").unwrap(), Rate::per_second(100.0));
        let r = Rate::parse("20/min").unwrap();
        assert!((r.per_second - 20.0 / 60.0).abs() < 1e-9 && r.burst == 20.0);
        let r = Rate::parse("1KiB/s burst 4096").unwrap();
        assert_eq!((r.per_second, r.burst), (1024.0, 4096.0));
        assert_eq!(Rate::parse("5/100ms").unwrap().per_second, 50.0);
        for bad in ["", "100", "x/s", "0/s", "10/fortnight", "10/s burst 0"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bucket_refills_and_caps() {
        let mut b = TokenBucket::new(Rate {
            per_second: 10.0,
            burst: 2.0,
        });
        let t0 = b.last;
        assert!(b.try_take_at(1.0, t0) && b.try_take_at(1.0, t0));
        assert!(!b.try_take_at(1.0, t0));
        assert!(b.try_take_at(1.0, t0 + Duration::from_millis(100)));
        assert!(
            b.try_take_at(2.0, t0 + Duration::from_secs(10)),
            "capped at burst"
        );
        assert!(!b.try_take_at(1.0, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn retry_delays_grow_and_cap() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let d: Vec<u128> = (1..5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(d, [100, 200, 300, 300]);
        assert_eq!(
            p.attempt_timeout(Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        assert!(p.validate().is_ok());
        assert!(RetryPolicy {
            max_attempts: 0,
            ..p
        }
        .validate()
        .is_err());
    }
}
