//! The README, run: its shell recipes against `edgebus up` exactly as written, and its
//! service example (`examples/greeter`) shown as it is, built, called and stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

const T: Duration = Duration::from_secs(5);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository")
        .to_owned()
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// `examples/greeter`, built (`cargo test` builds only this package's binaries).
fn greeter() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo())
        .args(["build", "--release", "--quiet", "-p", "greeter"])
        .output()
        .expect("cargo build -p greeter");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    repo().join("target/release/greeter")
}

/// The fenced blocks of `text` whose info string is `info`, in order.
pub(crate) fn blocks(text: &str, info: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_end() == format!("```{info}") => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => out.extend(current.take()),
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
        }
    }
    out
}

/// What each recipe command must print. Every command of a recipe block must be here, and
/// everything here must be in the README, so neither drifts from the other.
struct Expect {
    /// Substrings its output must hold.
    want: &'static [&'static str],
    /// It runs until stopped (a `mosquitto_sub` without `-C`, `--watch`): stopped once the
    /// output holds everything wanted.
    forever: bool,
}

fn expectations() -> BTreeMap<&'static str, Expect> {
    let once = |want| Expect {
        want,
        forever: false,
    };
    let forever = |want| Expect {
        want,
        forever: true,
    };
    BTreeMap::from([
        // Try it.
        (
            "mosquitto_sub -t 'edge/#' -v",
            forever(&["edge/health/heartbeat/echo/", "edge/system/discovery/kv/"]),
        ),
        (
            "mosquitto_sub -t 'edge/demo/#' -V mqttv5 -F '%t %p %P' &",
            forever(&["edge/demo/hello hi origin:demo"]),
        ),
        (
            "mosquitto_pub -t edge/demo/hello -m 'hi' -V mqttv5 -D publish user-property origin demo",
            once(&[]),
        ),
        ("mosquitto_pub -t edge/demo/state -m on -r", once(&[])),
        ("mosquitto_sub -t edge/demo/state -C 1", once(&["\non"])),
        (
            "mosquitto_sub -t edge/system/broker/stats -C 1",
            once(&["\"connections\":", "\"dropped\":", "\"rss_bytes\":"]),
        ),
        (
            "mosquitto_rr -t edge/echo/echo/request -e my/replies -m '{\"hello\":\"bus\"}'",
            once(&["{\"success\":true,\"data\":{\"hello\":\"bus\"}", "\"service\":\"echo\""]),
        ),
        (
            "mosquitto_sub -t my/replies -V 311 &",
            forever(&["\"success\":true", "\"correlation_id\":\"c1\"", "\"data\":{\"x\":1}"]),
        ),
        (
            "mosquitto_pub -V 311 -t edge/echo/echo/request -m '{\"reply_to\":\"my/replies\",\"correlation_id\":\"c1\",\"x\":1}'",
            once(&[]),
        ),
        (
            "mosquitto_sub -t 'edge/echo/echo/+' -v &",
            forever(&["edge/echo/echo/result {\"success\":true,\"data\":{\"x\":2}"]),
        ),
        ("mosquitto_pub -t edge/echo/echo/request -m '{\"x\":2}'", once(&[])),
        (
            "mosquitto_sub -t edge/hostmetrics/events/reading -C 1",
            once(&["\"type\":\"hostmetrics.reading\"", "\"load\""]),
        ),
        (
            "edgebus call hostmetrics/read",
            once(&["\"success\":true", "\"service\":\"hostmetrics\""]),
        ),
        // Discovery and health.
        (
            "mosquitto_sub -t 'edge/health/#' -t 'edge/system/discovery/update' -v",
            forever(&["edge/health/heartbeat/kv/", "edge/health/status/echo"]),
        ),
        (
            "edgebus services          # the registry, a table (or --json)",
            once(&["SERVICE", "echo", "hostmetrics", "kv", "orchestrator", "online"]),
        ),
        (
            "edgebus health --watch    # status per service, then alerts as they come",
            forever(&["SERVICE", "echo", "healthy", "seen"]),
        ),
        // Sagas.
        (
            "mosquitto_rr -t edge/saga/order/request -e r/1 -m '{\"order\":\"A1\",\"qty\":2,\"amount\":10,\"address\":\"Main St 1\"}'",
            once(&["\"success\":true", "\"status\":\"completed\""]),
        ),
        (
            "mosquitto_rr -t edge/kv/put/request -e r/1 -m '{\"key\":\"payment/A2\",\"value\":1}'",
            once(&["\"success\":true"]),
        ),
        (
            "mosquitto_rr -t edge/saga/order/request -e r/1 -m '{\"order\":\"A2\",\"qty\":1,\"amount\":5,\"address\":\"x\"}'",
            once(&["\"success\":false", "\"code\":\"CONFLICT\"", "undone: reserve"]),
        ),
        (
            "mosquitto_rr -t edge/kv/stats/request -e r/1 -m '{}'",
            once(&["\"success\":true"]),
        ),
        (
            "mosquitto_sub -t 'edge/saga/+/runs/+' -v",
            forever(&["edge/saga/order/runs/", "\"status\":\"completed\""]),
        ),
    ])
}

/// The environment a recipe runs in: `edgebus` on the PATH, mosquitto's clients pointed at
/// the bus's port by their options files (`$XDG_CONFIG_HOME/mosquitto_sub`, as a user's
/// `~/.config` would), so the commands run exactly as the README writes them.
struct Shell {
    env: Vec<(String, String)>,
    _dir: TempDir,
}

impl Shell {
    fn new(port: &str) -> Shell {
        let dir = TempDir::new("recipes");
        let xdg = dir.0.join("config");
        std::fs::create_dir_all(&xdg).expect("config dir");
        // -d on mosquitto_sub: its "received SUBACK" line says when a background subscriber
        // is subscribed, so the next command need not guess with a sleep.
        std::fs::write(xdg.join("mosquitto_sub"), format!("-p {port}\n-d\n")).expect("write");
        std::fs::write(xdg.join("mosquitto_pub"), format!("-p {port}\n")).expect("write");
        std::fs::write(xdg.join("mosquitto_rr"), format!("-p {port}\n-W 10\n")).expect("write");
        let bin = Path::new(env!("CARGO_BIN_EXE_edgebus"))
            .parent()
            .expect("bin dir")
            .to_owned();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Shell {
            env: vec![
                ("PATH".into(), path),
                ("XDG_CONFIG_HOME".into(), xdg.display().to_string()),
                ("EDGEBUS_BROKER".into(), format!("127.0.0.1:{port}")),
                ("EDGEBUS_LOG".into(), "warn".into()),
            ],
            _dir: dir,
        }
    }

    fn command(&self, line: &str) -> Command {
        let mut c = Command::new("bash");
        c.args(["-c", &format!("exec stdbuf -oL {line}")]);
        c.env_remove("EDGEBUS_CONFIG");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
}

/// Reads `p`'s lines until every `want` has been seen; panics after `timeout`.
fn expect_all(p: &Proc, line: &str, want: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut out = String::new();
    while !want.iter().all(|w| format!("\n{out}").contains(w)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match p.lines.recv_timeout(left) {
            Ok(l) => {
                out.push_str(&l);
                out.push('\n');
            }
            Err(_) => panic!("`{line}`: wanted {want:?} within {timeout:?}; printed:\n{out}"),
        }
    }
    out
}

/// Every `sh recipe` block of the README, run command by command against `edgebus up`
/// started as the README says (no `-c`: the shipped topics.toml), each output checked.
#[test]
fn readme_recipes_run_as_written() {
    let text = readme();
    let recipes = blocks(&text, "sh recipe");
    assert!(recipes.len() >= 4, "recipe blocks found: {}", recipes.len());
    let expect = expectations();
    let mut used = std::collections::BTreeSet::new();

    let dir = TempDir::new("readme-up");
    let mut cmd = edgebus();
    cmd.current_dir(&dir.0)
        .env_remove("EDGEBUS_CONFIG")
        .args(["up", "--listen", "127.0.0.1:0"]);
    let (_up, addr) = start_up(cmd, true);
    let port = addr.port().to_string();
    let shell = Shell::new(&port);

    for block in &recipes {
        let mut background: Vec<(String, Proc)> = Vec::new();
        for raw in block.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let e = expect
                .get(line)
                .unwrap_or_else(|| panic!("README recipe without a check in readme.rs: `{line}`"));
            used.insert(line);
            if let Some(cmd) = line.strip_suffix('&') {
                let p = Proc::spawn(shell.command(cmd.trim()));
                p.expect_line("received SUBACK", T);
                background.push((line.to_owned(), p));
            } else if e.forever {
                let p = Proc::spawn(shell.command(line));
                expect_all(&p, line, e.want, Duration::from_secs(10));
            } else {
                let mut p = Proc::spawn(shell.command(line));
                let status = p.wait_exit(Duration::from_secs(15));
                let mut out = String::new();
                while let Ok(l) = p.lines.recv_timeout(Duration::from_millis(100)) {
                    out.push_str(&l);
                    out.push('\n');
                }
                let status =
                    status.unwrap_or_else(|| panic!("`{line}` still running; printed:\n{out}"));
                let wanted_failure = e.want.contains(&"\"success\":false");
                assert!(
                    status.success() || wanted_failure,
                    "`{line}` failed ({status:?}):\n{out}"
                );
                for w in e.want {
                    assert!(
                        format!("\n{out}").contains(w),
                        "`{line}`: no {w:?} in:\n{out}"
                    );
                }
            }
        }
        for (line, p) in &background {
            let e = &expect[line.as_str()];
            expect_all(p, line, e.want, T);
        }
    }
    let unused: Vec<_> = expect.keys().filter(|k| !used.contains(*k)).collect();
    assert!(
        unused.is_empty(),
        "checks for commands no longer in the README: {unused:?}"
    );
}

/// The README shows `examples/greeter` as it is: its `src/main.rs`, and its `[dependencies]`
/// (but the path to the runtime), in at most 25 lines of code.
#[test]
fn readme_service_example_is_examples_greeter() {
    let text = readme();
    let main =
        std::fs::read_to_string(repo().join("examples/greeter/src/main.rs")).expect("main.rs");
    assert!(
        blocks(&text, "rust").contains(&main),
        "the README's service example differs from examples/greeter/src/main.rs"
    );
    let code = main
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim().starts_with("//"))
        .count();
    assert!(code <= 25, "the service example has {code} lines of code");
    let cargo =
        std::fs::read_to_string(repo().join("examples/greeter/Cargo.toml")).expect("Cargo.toml");
    let deps: Vec<&str> = cargo
        .split("\n[dependencies]\n")
        .nth(1)
        .expect("[dependencies]")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("edgebus-runtime"))
        .collect();
    let shown = blocks(&text, "toml")
        .into_iter()
        .find(|b| b.starts_with("[dependencies]\nedgebus-runtime"))
        .expect("a toml block with the example's [dependencies]");
    let shown: Vec<&str> = shown
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("edgebus-runtime"))
        .collect();
    assert_eq!(
        shown, deps,
        "the README's dependencies differ from examples/greeter/Cargo.toml"
    );
}

/// `examples/greeter` built and run as the README says: ready once registered, answers
/// `mosquitto_rr` with its greeting and its event, stops on SIGTERM within 2 s with its
/// `stopped` record left in place (its Last Will does not replace it), and keeps its instance
/// id across a restart when `EDGEBUS_INSTANCE` gives one: one row in the registry.
#[test]
fn readme_service_example_runs() {
    let exe = greeter();

    let dir = TempDir::new("greeter");
    let cfg = dir.file(
        "topics.toml",
        "[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n[up]\nservices = []\n",
    );
    let mut cmd = edgebus();
    cmd.arg("up").arg("-c").arg(&cfg);
    let (_up, addr) = start_up(cmd, true);
    let port = addr.port().to_string();
    let addr = addr.to_string();

    let start = || {
        let mut c = Command::new(&exe);
        c.env("EDGEBUS_BROKER", &addr)
            .env("EDGEBUS_INSTANCE", "greeter-1")
            .env_remove("EDGEBUS_CONFIG")
            .env_remove("EDGEBUS_LOG");
        let p = Proc::spawn(c);
        p.expect_line("greeter ready as greeter-1", T);
        p
    };
    let events = Sub::start(&port, &["-t", "edge/greeter/events/greeted"]);
    let mut greeter = start();
    let (ok, out) = rr(
        &port,
        &[
            "-t",
            "edge/greeter/hello/request",
            "-e",
            "my/replies",
            "-m",
            r#"{"name":"pi"}"#,
            "-W",
            "5",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains(r#""data":{"greeting":"hello, pi"}"#), "{out}");
    assert!(out.contains(r#""instance":"greeter-1""#), "{out}");
    // Its version is its own crate's (examples/greeter is 1.0.0; the runtime is not).
    let retained = || {
        run_tool(
            "mosquitto_sub",
            &port,
            &[
                "-t",
                "edge/system/discovery/greeter/greeter-1",
                "-C",
                "1",
                "-W",
                "5",
            ],
        )
        .1
    };
    let reg = retained();
    assert!(reg.contains(r#""version":"1.0.0""#), "{reg}");
    let ev = json_of(&events.next(T).expect("the greeted event"));
    assert_eq!(ev["type"], "greeter.greeted", "{ev}");
    assert_eq!(ev["data"]["name"], "pi", "{ev}");

    // SIGTERM: out within 2 s, exit 0, the stopped record retained and left alone.
    let registration = Sub::start(&port, &["-t", "edge/system/discovery/greeter/greeter-1"]);
    registration.next(T).expect("the retained registration");
    greeter.signal("TERM");
    let status = greeter
        .wait_exit(Duration::from_secs(2))
        .expect("exit within 2 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    let stopped = json_of(&registration.next(T).expect("the stopped record"));
    assert_eq!(stopped["reason"], "stopped", "{stopped}");
    // A will would arrive as soon as the broker saw the socket close; a fresh subscriber
    // (connected after the process is gone) still reads the stopped record.
    assert_exchange(&port, "after-greeter-exit");
    let now = retained();
    assert!(now.contains(r#""reason":"stopped""#), "{now}");
    assert!(
        registration.next(Duration::from_millis(300)).is_none(),
        "the record changed again"
    );

    // Started again with the same instance id: one row in the registry, online.
    let _again = start();
    let out = run_edgebus(&["services", "--json", "--broker", &addr], None, T);
    assert!(out.ok, "{}", out.stderr);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let rows: Vec<_> = list["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter(|i| i["service"] == "greeter")
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "online", "{rows:?}");
}

/// A service that calls `init_logging()` says what it is doing from the start: with no
/// broker, that it cannot connect, within a second; SIGTERM then ends it at once, cleanly.
#[test]
fn readme_service_example_logs_and_stops_while_connecting() {
    let mut c = Command::new(greeter());
    c.env("EDGEBUS_BROKER", format!("127.0.0.1:{}", free_port()))
        .env_remove("EDGEBUS_CONFIG")
        .env_remove("EDGEBUS_LOG");
    let mut p = Proc::spawn(c);
    p.expect_line("cannot connect; retrying", Duration::from_secs(1));
    p.signal("TERM");
    let status = p
        .wait_exit(Duration::from_secs(2))
        .expect("exit within 2 s");
    assert!(status.success(), "{status:?}");
}

/// The README's journal example shows a correlation id of the form the runtime makes (16
/// hex digits, then a hex counter), as a request from `edgebus call` carries it.
#[test]
fn readme_correlation_id_example_has_the_runtime_form() {
    let text = readme();
    let example = text
        .split("journalctl CORRELATION_ID=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the journalctl example");
    let form = |id: &str| id.len() > 16 && id.chars().all(|c| c.is_ascii_hexdigit());
    assert!(form(example), "README example `{example}`");
    let broker = Broker::start();
    let port = broker.port();
    let sub = Sub::start(
        &port,
        &[
            "-t",
            "edge/echo/echo/request",
            "-F",
            "MSG %D",
            "-V",
            "mqttv5",
        ],
    );
    let out = run_edgebus(
        &[
            "call",
            "echo/echo",
            "--broker",
            &broker.addr.to_string(),
            "--timeout",
            "300ms",
        ],
        None,
        T,
    );
    assert!(!out.ok);
    let seen = sub.next(T).expect("the request");
    let id = seen.trim();
    assert!(form(id), "the runtime's correlation data `{id}`");
}
