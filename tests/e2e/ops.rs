//! Operating the parts: the test plays systemd (a NOTIFY_SOCKET it listens on) to watch
//! READY, WATCHDOG and STATUS; a wedged runtime stops the watchdog; `/metrics` is scraped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edgebus_runtime::bus::{Bus, BusOptions};
use edgebus_runtime::service::{Request, ServiceBuilder};
use edgebus_runtime::systemd::{bus_probe, runtime_probe, Notifier, Supervisor};
use edgebus_runtime::wire::ServiceError;
use serde_json::Value;

use crate::harness::{edgebus, free_port, rr, start_up, Broker, Proc, TempDir};

/// A datagram socket playing the service manager's part.
struct Manager {
    path: PathBuf,
    rx: mpsc::Receiver<(Instant, String)>,
    _dir: TempDir,
}

impl Manager {
    fn new() -> Manager {
        let dir = TempDir::new("notify");
        let path = dir.0.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), m)).is_err() {
                    break;
                }
            }
        });
        Manager {
            path,
            rx,
            _dir: dir,
        }
    }

    /// The next notification containing `needle` within `timeout`.
    fn expect(&self, needle: &str, timeout: Duration) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok((t, m)) if m.contains(needle) => return (t, m),
                Ok((_, m)) => seen.push(m),
                Err(_) => {
                    panic!("no notification with {needle:?} within {timeout:?}; saw {seen:?}")
                }
            }
        }
    }

    /// Notifications containing `needle` over `window`.
    fn count(&self, needle: &str, window: Duration) -> usize {
        let deadline = Instant::now() + window;
        let mut n = 0;
        while let Ok((_, m)) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            n += usize::from(m.contains(needle));
        }
        n
    }

    /// The environment systemd gives a `Type=notify` unit with `WatchdogSec=`.
    fn env(&self, cmd: &mut std::process::Command, watchdog: Duration) {
        cmd.env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", watchdog.as_micros().to_string());
    }
}

#[test]
fn broker_notifies_ready_when_listening_and_pings_while_running() {
    let m = Manager::new();
    // The built-in settings keep retained messages in the working directory: a scratch one.
    let dir = TempDir::new("notify");
    let mut cmd = edgebus();
    cmd.current_dir(&dir.0).env_remove("STATE_DIRECTORY").args([
        "broker",
        "--listen",
        "127.0.0.1:0",
    ]);
    m.env(&mut cmd, Duration::from_millis(400));
    let mut proc = Proc::spawn(cmd);
    let (_, ready) = m.expect("READY=1", Duration::from_secs(10));
    // READY means serving: the address in the status accepts an MQTT session at once.
    let addr: SocketAddr = ready
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {ready:?}"));
    let (ok, out) =
        crate::harness::publish(&addr.port().to_string(), &["-t", "t/ready", "-m", "x"]);
    assert!(ok, "no MQTT session right after READY: {out}");
    assert!(ready.contains("STATUS=listening on"), "{ready}");
    let pings = m.count("WATCHDOG=1", Duration::from_secs(1));
    assert!(pings >= 3, "{pings} pings in 1 s with WatchdogSec=400ms");
    // A stopped process sends nothing; once continued, it pings again.
    proc.signal("STOP");
    let _ = m.count("", Duration::from_millis(100));
    let stopped = m.count("WATCHDOG=1", Duration::from_millis(800));
    proc.signal("CONT");
    assert_eq!(stopped, 0, "pings while SIGSTOPped");
    m.expect("WATCHDOG=1", Duration::from_secs(2));
    proc.signal("TERM");
    m.expect("STOPPING=1", Duration::from_secs(5));
    assert!(proc.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn service_notifies_ready_only_once_registered() {
    // The broker is not there yet: the service retries, and must not claim to be ready.
    let port = free_port();
    let m = Manager::new();
    let mut cmd = edgebus();
    cmd.args(["service", "echo", "--broker", &format!("127.0.0.1:{port}")]);
    m.env(&mut cmd, Duration::from_millis(600));
    let _svc = Proc::spawn(cmd);
    assert_eq!(
        m.count("READY=1", Duration::from_millis(1500)),
        0,
        "READY without a broker"
    );
    let broker = Broker::start_on(port);
    let (_, ready) = m.expect("READY=1", Duration::from_secs(15));
    // Ready means registered and subscribed: a request right now is answered.
    let (ok, out) = rr(
        &broker.port(),
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "t/echo-reply",
            "-m",
            r#"{"hi":1}"#,
            "-W",
            "3",
        ],
    );
    assert!(ok && out.contains("\"success\":true"), "{out}");
    assert!(
        ready.contains("STATUS=echo echo-") && ready.contains("connected to"),
        "{ready}"
    );
    // Pings, and a status line that follows the traffic.
    m.expect("WATCHDOG=1", Duration::from_secs(2));
    m.expect("1 requests, 0 errors", Duration::from_secs(3));
}

#[test]
fn a_wedged_runtime_stops_the_watchdog_until_it_recovers() {
    let broker = Broker::start();
    let m = Manager::new();
    // One worker: a handler that blocks it wedges the whole runtime, the classic bug.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (_bus, _service, supervisor) = rt.block_on(async {
        let o = BusOptions::for_service(broker.addr.to_string(), "edge", "wedge", None);
        let bus = Bus::connect(o).expect("bus");
        let service = ServiceBuilder::new("wedge")
            .endpoint("block", |req: Request<Value>| async move {
                let ms = req.data.get("ms").and_then(Value::as_u64).unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                Ok::<_, ServiceError>(Value::Null)
            })
            .start(&bus)
            .await
            .expect("service");
        while !bus.sync(Duration::from_secs(2)).await {}
        let supervisor =
            Supervisor::new(Notifier::to_path(&m.path), Some(Duration::from_millis(400)))
                .probe("runtime", runtime_probe(tokio::runtime::Handle::current()))
                .probe("bus", bus_probe(&bus))
                .ready();
        (bus, service, supervisor)
    });
    m.expect("READY=1", Duration::from_secs(2));
    assert!(m.count("WATCHDOG=1", Duration::from_secs(1)) >= 3);
    let (ok, out) = crate::harness::publish(
        &broker.port(),
        &["-t", "edge/wedge/block/request", "-m", r#"{"ms":2500}"#],
    );
    assert!(ok, "{out}");
    let (wedged_at, status) = m.expect("STATUS=UNHEALTHY", Duration::from_secs(2));
    assert!(
        status.contains("runtime: the runtime did not run a task"),
        "{status}"
    );
    // While wedged: no ping at all.
    let mut pings_while_wedged = 0;
    let mut resumed = None;
    while let Ok((t, msg)) = m.rx.recv_timeout(Duration::from_secs(5)) {
        if msg == "WATCHDOG=1" {
            resumed = Some(t);
            break;
        }
        pings_while_wedged += usize::from(msg.contains("WATCHDOG"));
    }
    assert_eq!(pings_while_wedged, 0);
    let resumed = resumed.expect("pings resumed once the handler returned");
    let silent = resumed - wedged_at;
    assert!(
        silent >= Duration::from_millis(1500),
        "silent only {silent:?}"
    );
    supervisor.stopping("done");
    drop(rt);
}

/// `GET path` over HTTP/1.1; returns the status line and the body.
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let (head, body) = out.split_once("\r\n\r\n").expect("head and body");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// One sample of the exposition text: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Parses the text format strictly enough to catch a malformed line.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line == "# EOF",
                "bad comment line: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((n, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels: {line}"));
                let labels = inner
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label: {line}"));
                        (k.to_owned(), v.trim_matches('"').to_owned())
                    })
                    .collect();
                (n.to_owned(), labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name: {line}"
        );
        out.push((name, labels, value));
    }
    out
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.2)
}

#[test]
fn up_is_ready_once_every_part_is_and_serves_metrics() {
    let dir = TempDir::new("metrics");
    let cfg = dir.file(
        "topics.toml",
        "[broker]\nlisten = \"127.0.0.1:0\"\n[up]\nservices = [\"echo\"]\n",
    );
    let m = Manager::new();
    let mut cmd = edgebus();
    cmd.arg("up")
        .arg("-c")
        .arg(&cfg)
        .args(["--metrics", "127.0.0.1:0"]);
    m.env(&mut cmd, Duration::from_secs(2));
    let (proc, addr) = start_up(cmd, false);
    let port = addr.port().to_string();
    let line = proc.expect_line("edgebus metrics on http://", Duration::from_secs(10));
    let metrics: SocketAddr = line
        .trim_start_matches("edgebus metrics on http://")
        .trim_end_matches("/metrics")
        .parse()
        .expect("metrics address");
    let (_, ready) = m.expect("READY=1", Duration::from_secs(15));
    for part in ["discovery", "health-monitor", "echo"] {
        assert!(ready.contains(part), "{part} not in {ready}");
    }
    // Every part is serving at READY: echo answers, discovery lists echo.
    let echo = |msg: &str| {
        rr(
            &port,
            &[
                "-t",
                "edge/echo/echo/request",
                "-e",
                "t/metrics-reply",
                "-m",
                msg,
                "-W",
                "3",
            ],
        )
    };
    let (ok, out) = echo(r#"{"n":1}"#);
    assert!(ok && out.contains("\"success\":true"), "{out}");
    let (ok, out) = echo(r#"{"delay_ms":"soon"}"#);
    assert!(ok && out.contains("BAD_REQUEST"), "{out}");

    let (status, body) = http_get(metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.trim_end().ends_with("# EOF"), "no # EOF:\n{body}");
    let samples = parse_exposition(&body);
    let ep = [("service", "echo"), ("endpoint", "echo")];
    assert_eq!(
        value(&samples, "edgebus_endpoint_requests_total", &ep),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        value(&samples, "edgebus_endpoint_errors_total", &ep),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "edgebus_endpoint_duration_seconds_count", &ep),
        Some(2.0)
    );
    let buckets: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == "edgebus_endpoint_duration_seconds_bucket"
                && l.iter().any(|(k, v)| k == "service" && v == "echo")
                && l.iter().any(|(k, v)| k == "endpoint" && v == "echo")
        })
        .map(|s| s.2)
        .collect();
    assert!(buckets.len() >= 10, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0] <= w[1]),
        "not cumulative: {buckets:?}"
    );
    assert_eq!(buckets.last(), Some(&2.0));
    for part in ["discovery", "health-monitor", "echo"] {
        assert_eq!(
            value(&samples, "edgebus_bus_connected", &[("service", part)]),
            Some(1.0),
            "{part}"
        );
    }
    let conns = value(&samples, "edgebus_broker_connections", &[]).expect("broker connections");
    assert!(conns >= 3.0, "{conns}");
    assert!(value(&samples, "edgebus_broker_messages_in_total", &[]).unwrap_or(0.0) >= 2.0);
    assert!(value(
        &samples,
        "edgebus_broker_dropped_total",
        &[("reason", "rate_limited")]
    )
    .is_some());
    assert!(value(&samples, "edgebus_process_resident_memory_bytes", &[]).unwrap_or(0.0) > 1e6);
    let (status, _) = http_get(metrics, "/nothing");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    drop(proc);
}

/// Fields of one journal native-protocol datagram (`KEY=VALUE\n`, or `KEY\n` + u64 LE length
/// + bytes + `\n`).
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let Some(nl) = d.iter().position(|b| *b == b'\n') else {
            break;
        };
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            d = &d[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("length")) as usize;
            out.push((key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned()));
            d = &rest[8 + len + 1..];
        }
    }
    out
}

#[test]
fn journal_lines_carry_service_endpoint_and_correlation_id() {
    // The service runs in a mount namespace of its own, where /run is a fresh tmpfs and
    // /run/systemd/journal is this test's directory: its journal socket is ours, and the
    // host's /run/systemd/journal is never touched, whether a journald lives there or not.
    let dir = TempDir::new("journal");
    let socket = UnixDatagram::bind(dir.0.join("socket")).expect("bind a journal socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let private = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !private {
        // No mount namespaces here (not root, or a sandbox forbids them): read what a live
        // journald recorded instead.
        return journal_via_journalctl();
    }
    let (_broker, _svc, id) = echo_request_logged_to_journal(Some(&dir.0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let fields = journal_fields(&buf[..n]);
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        if get("CORRELATION_ID").as_deref() == Some(id.as_str()) {
            assert_eq!(
                get("MESSAGE").as_deref(),
                Some("request served"),
                "{fields:?}"
            );
            assert_eq!(get("SERVICE").as_deref(), Some("echo"));
            assert_eq!(get("ENDPOINT").as_deref(), Some("echo"));
            assert_eq!(get("SYSLOG_IDENTIFIER").as_deref(), Some("edgebus"));
            assert_eq!(
                get("PRIORITY").as_deref(),
                Some("7"),
                "debug maps to priority 7"
            );
            return;
        }
        seen.push(get("MESSAGE").unwrap_or_default());
    }
    panic!("no journal entry with CORRELATION_ID={id}; messages: {seen:?}");
}

/// The same check against a live journald, read back with journalctl.
fn journal_via_journalctl() {
    let live =
        UnixDatagram::unbound().is_ok_and(|s| s.connect("/run/systemd/journal/socket").is_ok());
    assert!(
        live,
        "this test needs mount namespaces (run as root) or a live journald to read back"
    );
    let (_broker, _svc, id) = echo_request_logged_to_journal(None);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = std::process::Command::new("journalctl")
            .args([
                "-o",
                "cat",
                "--output-fields=SERVICE",
                &format!("CORRELATION_ID={id}"),
            ])
            .output()
            .expect("journalctl");
        if String::from_utf8_lossy(&out.stdout).contains("request served") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "journalctl found no entry for {id}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A broker and an echo service logging to the journal at debug level, and one request sent to
/// it with a fresh correlation id (returned; keep the broker and service while reading). With
/// `journal_dir`, the service sees that directory as its /run/systemd/journal.
fn echo_request_logged_to_journal(journal_dir: Option<&std::path::Path>) -> (Broker, Proc, String) {
    let broker = Broker::start();
    let edgebus_args = ["service", "echo", "--broker", &broker.addr.to_string()];
    let mut cmd = match journal_dir {
        None => {
            let mut c = edgebus();
            c.args(edgebus_args);
            c
        }
        Some(dir) => {
            let mut c = std::process::Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(
                    "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
                     mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
                )
                .arg(dir)
                .arg(env!("CARGO_BIN_EXE_edgebus"))
                .args(edgebus_args);
            c
        }
    };
    cmd.env("EDGEBUS_LOG_FORMAT", "journal")
        .env("EDGEBUS_LOG", "debug,rumqttd=off,rumqttc=off");
    let svc = Proc::spawn(cmd).expect_ready();
    let id = format!(
        "corr-{}-{}",
        std::process::id(),
        edgebus_runtime::bus::random_u64()
    );
    let (ok, out) = rr(
        &broker.port(),
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "t/journal",
            "-m",
            "{}",
            "-D",
            "publish",
            "correlation-data",
            &id,
            "-W",
            "3",
        ],
    );
    assert!(ok, "{out}");
    (broker, svc, id)
}
