//! A new user's first hour: what the README tells them to do, and what they meet on the way
//! (one test per finding of the first-hour review; the README's own recipes run in
//! `readme.rs`).

use std::time::{Duration, Instant};

use crate::harness::*;

const T: Duration = Duration::from_secs(5);

/// A unit stopped while the broker is away: each built-in service, SIGTERMed while it is
/// still trying to connect, exits 0 within 2 s (it used to panic: "`async fn` resumed after
/// completion").
#[test]
fn sigterm_while_connecting_exits_cleanly() {
    let nobody = format!("127.0.0.1:{}", free_port());
    for name in ["echo", "kv", "hostmetrics"] {
        let mut cmd = edgebus();
        cmd.args(["service", name, "--broker", &nobody]);
        let mut p = Proc::spawn(cmd);
        p.expect_line("cannot connect; retrying", T);
        p.signal("TERM");
        let t0 = Instant::now();
        let status = p.wait_exit(Duration::from_secs(2));
        let mut rest = Vec::new();
        while let Ok(l) = p.lines.recv_timeout(Duration::from_millis(50)) {
            rest.push(l);
        }
        let status = status.unwrap_or_else(|| panic!("{name}: still running 2 s after SIGTERM"));
        assert!(
            status.success(),
            "{name}: exit {status:?} after {:?}; output:\n{}",
            t0.elapsed(),
            rest.join("\n")
        );
        assert!(
            !rest.iter().any(|l| l.contains("panicked")),
            "{name}: {}",
            rest.join("\n")
        );
    }
}

/// `edgebus up -c` with `extra` appended (a free port, no stats), once `parts` parts are ready.
fn up_with(dir: &TempDir, extra: &str, parts: usize) -> (Proc, String) {
    let cfg = dir.file(
        "topics.toml",
        &format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n\
             [orchestrator]\njournal = \"{}/sagas.journal\"\n{extra}",
            dir.0.display()
        ),
    );
    let mut cmd = edgebus();
    cmd.arg("up").arg("-c").arg(&cfg);
    let (proc, addr) = start_up(cmd, false);
    let addr = addr.to_string();
    for _ in 0..parts {
        proc.expect_line("edgebus service ", Duration::from_secs(10));
    }
    (proc, addr)
}

fn reply_of(out: &Output) -> serde_json::Value {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not a reply ({e}): {}\n{}", out.stdout, out.stderr))
}

/// `cargo run --release -- up`, the README's first command, runs what the shipped
/// topics.toml describes: every part it lists, the orchestrator with the `order` saga and
/// kv, which that saga calls. Run from a scratch directory (the saga journal's place).
#[test]
fn up_without_config_runs_the_shipped_file() {
    let dir = TempDir::new("up-builtin");
    let mut cmd = edgebus();
    cmd.current_dir(&dir.0)
        .env_remove("EDGEBUS_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .args(["up", "--listen", "127.0.0.1:0"]);
    let (proc, addr) = start_up(cmd, false);
    let addr = addr.to_string();
    let mut ready = Vec::new();
    for _ in 0..6 {
        let l = proc.expect_line("edgebus service ", Duration::from_secs(10));
        ready.push(l.split(' ').nth(2).unwrap_or_default().to_owned());
    }
    ready.sort();
    assert_eq!(
        ready,
        [
            "discovery",
            "echo",
            "health-monitor",
            "hostmetrics",
            "kv",
            "orchestrator"
        ]
    );
    let out = run_edgebus(
        &[
            "call",
            "saga/order",
            r#"{"order":"o-1","qty":2,"amount":10,"address":"here"}"#,
            "--broker",
            &addr,
        ],
        None,
        Duration::from_secs(10),
    );
    let reply = reply_of(&out);
    assert!(out.ok, "{reply}");
    assert_eq!(reply["data"]["status"], "completed", "{reply}");
    assert!(
        dir.0.join("sagas.journal").exists(),
        "the journal is in the working directory"
    );
}

/// A request to a request topic the bus owns with nothing online to answer it gets
/// `NO_RESPONDERS` within a second: a saga with no orchestrator, an endpoint the service
/// does not have, a service that serves no endpoints, an unknown service.
#[test]
fn no_responders_for_every_request_topic_the_bus_owns() {
    let dir = TempDir::new("no-responders");
    let (_up, addr) = up_with(&dir, "[up]\nservices = [\"echo\", \"hostmetrics\"]\n", 4);
    let port = addr.rsplit(':').next().expect("port").to_owned();
    for (target, says) in [
        (
            "saga/order",
            "no orchestrator is online to run saga `order`",
        ),
        (
            "echo/nope",
            "`echo` has no endpoint `nope` (its endpoints: echo)",
        ),
        ("health-monitor/x", "`health-monitor` serves no endpoints"),
        ("nobody/x", "no service `nobody` is registered"),
    ] {
        let out = run_edgebus(&["call", target, "--broker", &addr], None, T);
        let reply = reply_of(&out);
        assert!(!out.ok);
        assert_eq!(reply["error"]["code"], "NO_RESPONDERS", "{target}: {reply}");
        let msg = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{target}: {reply}");
        assert!(
            out.took < Duration::from_secs(1),
            "{target}: took {:?}",
            out.took
        );
    }
    // mosquitto_rr, MQTT 5, gets the same for the saga.
    let (ok, out) = rr(
        &port,
        &[
            "-t",
            "edge/saga/order/request",
            "-e",
            "my/replies",
            "-m",
            "{}",
            "-W",
            "5",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("NO_RESPONDERS"), "{out}");
    // And a served endpoint is still answered, once.
    let out = run_edgebus(
        &["call", "echo/echo", r#"{"a":1}"#, "--broker", &addr],
        None,
        T,
    );
    assert!(out.ok, "{}\n{}", out.stdout, out.stderr);
}

/// `edgebus check-config` refuses what a part would refuse at start: a password file that
/// does not exist, named by file, line and key; the broker's own refusal says it once.
#[test]
fn check_config_refuses_a_missing_password_file() {
    let dir = TempDir::new("check-config");
    let missing = dir.0.join("no-such-passwd");
    let cfg = dir.file(
        "topics.toml",
        &format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\n\n[broker.auth]\npassword_file = \"{}\"\n",
            missing.display()
        ),
    );
    let cfg_s = cfg.to_str().expect("utf-8");
    let out = run_edgebus(&["check-config", "-c", cfg_s], None, T);
    assert!(!out.ok, "check-config said ok: {}", out.stdout);
    let want = format!(
        "{cfg_s}:5: key `broker.auth.password_file`: password file {}",
        missing.display()
    );
    assert!(out.stderr.contains(&want), "{}", out.stderr);
    let out = run_edgebus(&["broker", "-c", cfg_s], None, T);
    assert!(!out.ok);
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "the reason once: {}",
        out.stderr
    );
    // The shipped file, and the built-in defaults, pass.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../topics.toml");
    let out = run_edgebus(&["check-config", "-c", shipped], None, T);
    assert!(out.ok, "{}", out.stderr);
    let mut cmd = edgebus();
    cmd.current_dir(&dir.0).env_remove("EDGEBUS_CONFIG");
    let out = run_command(cmd, &["check-config"], None, T);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("built-in defaults"), "{}", out.stdout);
}

/// A field of the wrong type is named; an empty payload's error speaks JSON, not Rust.
#[test]
fn decode_errors_name_the_field() {
    let dir = TempDir::new("decode");
    let (_up, addr) = up_with(&dir, "[up]\nservices = [\"kv\"]\n", 3);
    let port = addr.rsplit(':').next().expect("port").to_owned();
    let out = run_edgebus(
        &["call", "kv/put", r#"{"key":5}"#, "--broker", &addr],
        None,
        T,
    );
    let reply = reply_of(&out);
    assert_eq!(reply["error"]["code"], "BAD_REQUEST", "{reply}");
    let msg = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("field `key`: invalid type: integer `5`"),
        "{reply}"
    );
    let (ok, out) = rr(
        &port,
        &["-t", "edge/kv/put/request", "-e", "my/r", "-n", "-W", "5"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("BAD_REQUEST") && out.contains("payload: empty"),
        "{out}"
    );
    assert!(
        !out.contains("struct") && !out.contains("Put"),
        "a Rust type leaked: {out}"
    );
}

/// `edgebus call` fails fast and says why: no broker, a broker that refuses the client, a
/// timeout of zero, a target that is not SERVICE/ENDPOINT; and it takes its payload from
/// stdin (`-`) or a file (`@FILE`), beyond what a shell argument holds.
#[test]
fn call_fails_fast_and_reads_stdin_and_files() {
    let nobody = format!("127.0.0.1:{}", free_port());
    let out = run_edgebus(&["call", "echo/echo", "--broker", &nobody], None, T);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains(&format!("cannot reach the broker at {nobody}")),
        "{}",
        out.stderr
    );
    assert!(out.took < Duration::from_secs(1), "took {:?}", out.took);

    let closed = Broker::start_with("[broker.auth]\nanonymous = \"deny\"\n");
    let out = run_edgebus(
        &["call", "echo/echo", "--broker", &closed.addr.to_string()],
        None,
        T,
    );
    assert!(!out.ok);
    assert!(
        out.stderr.contains("refused the connection"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("cannot reach"), "{}", out.stderr);
    assert!(out.took < Duration::from_secs(1), "took {:?}", out.took);

    let out = run_edgebus(&["call", "echo/echo", "--timeout", "0s"], None, T);
    assert!(!out.ok);
    assert!(out.stderr.contains("above zero"), "{}", out.stderr);
    let out = run_edgebus(&["call", "hostmetrics", "--broker", &nobody], None, T);
    assert!(!out.ok);
    assert!(out.stderr.contains("SERVICE/ENDPOINT"), "{}", out.stderr);
    assert!(out.took < Duration::from_secs(1), "took {:?}", out.took);

    let dir = TempDir::new("call-input");
    let (_up, addr) = up_with(&dir, "[up]\nservices = [\"echo\"]\n", 3);
    let out = run_edgebus(
        &["call", "echo/echo", "-", "--broker", &addr],
        Some(br#"{"from":"stdin"}"#),
        T,
    );
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(reply_of(&out)["data"]["from"], "stdin");
    // 200 KB: more than one shell argument may hold (128 KiB), less than max_payload.
    let big = "x".repeat(200_000);
    let file = dir.file("big.json", &format!(r#"{{"text":"{big}"}}"#));
    let at = format!("@{}", file.display());
    let out = run_edgebus(&["call", "echo/echo", &at, "--broker", &addr], None, T);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        reply_of(&out)["data"]["text"].as_str().map(str::len),
        Some(200_000)
    );
}

/// An instance that went offline and expired leaves the service's status record even while
/// another instance lives; the health view's `last_seen` is the last heartbeat, not the last
/// change of status.
#[test]
fn health_view_drops_expired_instances_and_shows_last_heartbeat() {
    let dir = TempDir::new("health-view");
    let (_up, addr) = up_with(
        &dir,
        "[up]\nservices = []\n[discovery]\nexpire_after = \"300ms\"\n",
        2,
    );
    let port = addr.rsplit(':').next().expect("port").to_owned();
    let status = Sub::start(&port, &["-t", "edge/health/status/echo"]);
    let broker: std::net::SocketAddr = addr.parse().expect("addr");
    let mut a = Service::start("echo", broker, &["--instance", "echo-a"]);
    let _b = Service::start("echo", broker, &["--instance", "echo-b"]);
    a._proc.signal("TERM");
    a._proc
        .wait_exit(Duration::from_secs(2))
        .expect("echo-a stopped");
    // The record lists echo-a offline, then (after expiry) only echo-b.
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = status
            .next(left)
            .expect("a status record without the expired echo-a");
        let v = json_of(&line);
        let names: Vec<&str> = v["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .filter_map(|i| i["instance"].as_str())
            .collect();
        if names == ["echo-b"] {
            break;
        }
    }
    // The status records were published seconds ago at most; the view says when each live
    // instance was last heard, from its heartbeats.
    let out = run_edgebus(&["health", "--json", "--broker", &addr], None, T);
    assert!(out.ok, "{}", out.stderr);
    let records: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let echo = records
        .as_array()
        .expect("records")
        .iter()
        .find(|r| r["service"] == "echo")
        .expect("echo's record");
    let inst = &echo["instances"][0];
    assert_eq!(inst["instance"], "echo-b", "{echo}");
    let seen = humantime::parse_rfc3339(inst["last_seen"].as_str().expect("last_seen"))
        .expect("a timestamp");
    let ago = std::time::SystemTime::now()
        .duration_since(seen)
        .unwrap_or_default();
    assert!(
        ago < Duration::from_millis(1500),
        "last_seen {ago:?} ago: {echo}"
    );
}

/// Ready means answered: a request sent the moment a service says it is ready is answered
/// by it, never refused with `NO_RESPONDERS` by a discovery that has not yet read the new
/// registration (ten fresh instances, one request each at once).
#[test]
fn a_request_right_after_ready_is_answered() {
    let dir = TempDir::new("ready-answered");
    let (_up, addr) = up_with(&dir, "[up]\nservices = []\n", 2);
    let broker: std::net::SocketAddr = addr.parse().expect("addr");
    for i in 0..10 {
        let echo = Service::start("echo", broker, &[]);
        let out = run_edgebus(
            &["call", "echo/echo", r#"{"n":1}"#, "--broker", &addr],
            None,
            T,
        );
        let reply = reply_of(&out);
        assert!(out.ok, "round {i}: {reply}");
        assert_eq!(
            reply["instance"],
            echo.instance.as_str(),
            "round {i}: {reply}"
        );
        drop(echo);
    }
}

/// Logs: `EDGEBUS_LOG_FORMAT=plain` keeps its timestamps; a process systemd started with
/// stderr not on the journal writes lines without one (the supervisor stamps them); a
/// service that calls `init_logging()` says at once that it cannot connect.
#[test]
fn log_lines_are_stamped_where_nothing_else_stamps_them() {
    let stamped = |l: &str| l.trim_start_matches("ERR ").starts_with("20");
    let nobody = format!("127.0.0.1:{}", free_port());
    let first_line = |format: Option<&str>, invocation: Option<&str>| {
        let mut cmd = edgebus();
        cmd.env_remove("EDGEBUS_LOG_FORMAT")
            .env_remove("INVOCATION_ID")
            .env_remove("JOURNAL_STREAM")
            .args(["service", "echo", "--broker", &nobody]);
        if let Some(f) = format {
            cmd.env("EDGEBUS_LOG_FORMAT", f);
        }
        if let Some(i) = invocation {
            cmd.env("INVOCATION_ID", i);
        }
        let p = Proc::spawn(cmd);
        p.expect_line("cannot connect; retrying", T)
    };
    let l = first_line(Some("plain"), None);
    assert!(stamped(&l), "plain without a timestamp: {l}");
    assert!(!l.contains('\x1b'), "plain with colour: {l}");
    let l = first_line(None, None);
    assert!(stamped(&l), "a pipe without a timestamp: {l}");
    let l = first_line(None, Some("0123456789abcdef"));
    assert!(!stamped(&l), "a line systemd will stamp again: {l}");
}
