//! Discovery and health end to end: `edgebus up` (broker, discovery, health monitor) and
//! `edgebus service echo` processes killed, stopped and frozen, watched by `mosquitto_sub`.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

const T: Duration = Duration::from_secs(5);

/// `edgebus up` with no example services, on a free port.
pub fn up(dir: &TempDir, extra: &str) -> (Proc, std::net::SocketAddr) {
    let cfg = dir.file(
        "topics.toml",
        &format!("[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n[up]\nservices = []\n{extra}"),
    );
    let mut cmd = edgebus();
    cmd.arg("up").arg("-c").arg(&cfg);
    start_up(cmd, true)
}

/// Updates and alerts about one instance, or every instance of one service.
pub struct Watch {
    sub: Sub,
    field: &'static str,
    value: String,
}

impl Watch {
    /// Updates and alerts about instance `instance`, as `update EVENT` / `alert FROM→TO`.
    pub fn start(port: &str, instance: &str) -> Watch {
        Watch::on(port, "instance", instance)
    }

    /// Updates and alerts about every instance of `service`, as `INSTANCE update EVENT` /
    /// `INSTANCE alert FROM→TO`.
    pub fn service(port: &str, service: &str) -> Watch {
        Watch::on(port, "service", service)
    }

    fn on(port: &str, field: &'static str, value: &str) -> Watch {
        let sub = Sub::start(
            port,
            &[
                "-t",
                "edge/system/discovery/update",
                "-t",
                "edge/health/alert",
                "-q",
                "1",
            ],
        );
        Watch {
            sub,
            field,
            value: value.to_owned(),
        }
    }

    /// The next update or alert that matches, as a short string, with its arrival time.
    pub fn next(&self, timeout: Duration) -> Option<(String, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.sub.next(left)?;
            let at = Instant::now();
            let v = json_of(&line);
            if v[self.field] != self.value.as_str() {
                continue;
            }
            let mut s = if line.starts_with("edge/health/alert ") {
                format!(
                    "alert {}→{}",
                    v["from"].as_str().unwrap_or(""),
                    v["to"].as_str().unwrap_or("")
                )
            } else {
                format!("update {}", v["event"].as_str().unwrap_or(""))
            };
            if self.field == "service" {
                s = format!("{} {s}", v["instance"].as_str().unwrap_or(""));
            }
            return Some((s, at));
        }
    }

    /// The next `n` items, in order of arrival, sorted within (updates and alerts come from
    /// two processes, so their relative order is not fixed).
    pub fn expect(&self, want: &[&str]) -> Instant {
        let mut got = Vec::new();
        let mut first = None;
        for _ in want {
            let (s, at) = self
                .next(T)
                .unwrap_or_else(|| panic!("expected {want:?}, got only {got:?} ({})", self.value));
            first.get_or_insert(at);
            got.push(s);
        }
        let mut a = got.clone();
        a.sort();
        let mut b: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        b.sort();
        assert_eq!(a, b, "sequence for {}", self.value);
        first.unwrap_or_else(Instant::now)
    }

    pub fn expect_quiet(&self, quiet: Duration) {
        if let Some((s, _)) = self.next(quiet) {
            panic!("unexpected {s} for {}", self.value);
        }
    }
}

/// The retained message on `topic`, if any.
pub fn retained(port: &str, topic: &str) -> Option<Value> {
    let (_, out) = run_tool("mosquitto_sub", port, &["-t", topic, "-C", "1", "-W", "1"]);
    out.lines()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("JSON"))
}

#[test]
fn sigkill_clean_stop_and_no_responders() {
    let dir = TempDir::new("presence");
    let (_up, addr) = up(&dir, "[discovery]\nexpire_after = \"2s\"\n");
    let port = addr.port().to_string();

    // SIGKILL: offline at once, exactly once.
    let w = Watch::start(&port, "echo-k");
    let echo = Service::start("echo", addr, &["--instance", "echo-k"]);
    w.expect(&["update registered", "alert offline→healthy"]);
    let t0 = Instant::now();
    echo._proc.signal("KILL");
    let seen = w.expect(&["update offline", "alert healthy→offline"]);
    let latency = seen - t0;
    eprintln!("SIGKILL → offline seen after {latency:?}");
    assert!(latency < Duration::from_secs(1), "{latency:?}");

    // A request now fails fast with NO_RESPONDERS, instead of waiting for its timeout.
    let t0 = Instant::now();
    let (ok, out) = rr(
        &port,
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "test/nr",
            "-m",
            "{}",
            "-W",
            "5",
        ],
    );
    let took = t0.elapsed();
    assert!(ok, "{out}");
    assert!(out.contains("NO_RESPONDERS"), "{out}");
    assert!(took < Duration::from_secs(2), "NO_RESPONDERS took {took:?}");

    // Expiry: the offline record is deleted, once.
    w.expect(&["update expired"]);
    assert!(retained(&port, "edge/system/discovery/echo/echo-k").is_none());

    // A clean stop: deregistered, and no will afterwards.
    let w = Watch::start(&port, "echo-s");
    let echo = Service::start("echo", addr, &["--instance", "echo-s"]);
    w.expect(&["update registered", "alert offline→healthy"]);
    let status = retained(&port, "edge/health/status/echo").expect("status retained");
    assert_eq!(status["status"], "healthy", "{status}");
    echo._proc.signal("TERM");
    w.expect(&["update deregistered", "alert healthy→offline"]);
    w.expect_quiet(Duration::from_millis(1500));
    let rec = retained(&port, "edge/system/discovery/echo/echo-s");
    if let Some(rec) = rec {
        assert_eq!(rec["reason"], "stopped", "{rec}");
    }
}

#[test]
fn sigstop_turns_unhealthy_then_recovers() {
    let dir = TempDir::new("presence-stop");
    let (_up, addr) = up(&dir, "");
    let port = addr.port().to_string();
    let w = Watch::start(&port, "echo-z");
    let echo = Service::start("echo", addr, &["--instance", "echo-z"]);
    w.expect(&["update registered", "alert offline→healthy"]);
    // Let a heartbeat or two pass, so the instance is past its first beat.
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    echo._proc.signal("STOP");
    let seen = w.expect(&["alert healthy→unhealthy"]);
    let latency = seen - t0;
    eprintln!("SIGSTOP → unhealthy after {latency:?}");
    assert!(latency <= Duration::from_millis(3500), "{latency:?}");
    let status = retained(&port, "edge/health/status/echo").expect("status");
    assert_eq!(status["status"], "unhealthy", "{status}");
    echo._proc.signal("CONT");
    w.expect(&["alert unhealthy→healthy"]);
    w.expect_quiet(Duration::from_millis(1500));
}
