//! Real processes on free ports, killed when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `edgebus` binary under test.
/// The broker's state file in its persistence directory.
pub const STATE_FILE: &str = "broker-state.log";

pub fn edgebus() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgebus"));
    c.env("EDGEBUS_LOG", "info");
    c
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("edgebus-e2e-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, SIGKILLed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr read line by line (stderr lines prefixed `ERR `).
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx2.send(format!("ERR {line}")).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines: rx }
    }

    /// Waits for a line containing `needle`; returns it, or panics with what was seen.
    pub fn expect_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(l) => seen.push(l),
                Err(_) => panic!(
                    "no line containing {needle:?} within {timeout:?}; saw:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }

    /// The next line within `timeout` that contains `needle`, if any.
    pub fn find_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Waits for `edgebus service … ready as …` on stdout and returns the process.
    pub fn expect_ready(self) -> Proc {
        self.expect_line("ready as", Duration::from_secs(10));
        self
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for exit within `timeout`; returns whether it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `edgebus broker` on a free loopback port.
pub struct Broker {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub ws: Option<SocketAddr>,
    pub _dir: Option<TempDir>,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with("")
    }

    /// Starts with extra `[broker]` settings (TOML lines) in a config of its own.
    pub fn start_with(broker_toml: &str) -> Broker {
        let dir = TempDir::new("broker");
        let cfg = dir.file(
            "topics.toml",
            &format!(
                "[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"200ms\"\n{broker_toml}\n"
            ),
        );
        let mut b = Broker::start_config(&cfg, broker_toml.contains("websocket"));
        b._dir = Some(dir);
        b
    }

    /// Starts `edgebus broker -c cfg`; `websocket` says whether the config has that listener.
    pub fn start_config(cfg: &Path, websocket: bool) -> Broker {
        Broker::start_args(cfg, websocket, &[])
    }

    /// Starts a plain broker on a given loopback port (to restart one where it was).
    pub fn start_on(port: u16) -> Broker {
        let dir = TempDir::new("broker");
        let cfg = dir.file("topics.toml", "[broker]\nstats_interval = \"0s\"\n");
        let listen = format!("127.0.0.1:{port}");
        let mut b = Broker::start_args(&cfg, false, &["--listen", &listen]);
        b._dir = Some(dir);
        b
    }

    /// Starts `edgebus broker -c cfg ARGS…`.
    pub fn start_args(cfg: &Path, websocket: bool, args: &[&str]) -> Broker {
        let mut cmd = edgebus();
        cmd.arg("broker").arg("-c").arg(cfg).args(args);
        let proc = Proc::spawn(cmd);
        let addr = broker_addr(&proc);
        // Printed right after the MQTT line, only when configured: no waiting otherwise.
        let ws = websocket.then(|| listening(&proc, "edgebus websocket listening on "));
        Broker {
            proc,
            addr,
            ws,
            _dir: None,
        }
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }
}

/// A `mosquitto_sub` printing `MSG topic payload` lines.
pub struct Sub(pub Proc);

impl Sub {
    /// Subscribes and waits for the SUBACK.
    pub fn start(port: &str, args: &[&str]) -> Sub {
        let s = Sub::start_nowait(port, args);
        s.0.expect_line("received SUBACK", Duration::from_secs(5));
        s
    }

    pub fn start_nowait(port: &str, args: &[&str]) -> Sub {
        // Line-buffered: mosquitto_sub does not flush its debug lines into a pipe.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub", "-d", "-p", port, "-F", "MSG %t %p"])
            .args(args);
        Sub(Proc::spawn(cmd))
    }

    /// The next message line (`topic payload`) within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.0
            .find_line("MSG ", timeout)
            .map(|l| l.trim_start_matches("MSG ").to_owned())
    }

    /// Collects messages until `timeout` passes with none.
    pub fn drain(&self, quiet: Duration) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(m) = self.next(quiet) {
            v.push(m);
        }
        v
    }
}

/// Runs `mosquitto_pub` to completion (10 s bound); returns success and its output.
pub fn publish(port: &str, args: &[&str]) -> (bool, String) {
    run_tool("mosquitto_pub", port, args)
}

/// Runs a mosquitto client tool to completion (10 s bound).
pub fn run_tool(tool: &str, port: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(tool);
    cmd.args(["-p", port]).args(args);
    let mut p = Proc::spawn(cmd);
    let status = p.wait_exit(Duration::from_secs(10));
    let mut out = Vec::new();
    while let Ok(l) = p.lines.recv_timeout(Duration::from_millis(50)) {
        out.push(l);
    }
    (status.is_some_and(|s| s.success()), out.join("\n"))
}

/// The proof a listener is healthy: a fresh subscriber receives a fresh publish.
pub fn assert_exchange(port: &str, tag: &str) {
    let topic = format!("edge/check/{tag}");
    let sub = Sub::start(port, &["-t", &topic, "-q", "1"]);
    let (ok, out) = publish(port, &["-t", &topic, "-m", tag, "-q", "1"]);
    assert!(ok, "publish after {tag} failed: {out}");
    let got = sub.next(Duration::from_secs(5));
    assert_eq!(
        got.as_deref(),
        Some(format!("{topic} {tag}").as_str()),
        "exchange after {tag}"
    );
}

/// A raw TCP connection for hand-made packets.
pub fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// An MQTT 3.1.1 CONNECT.
pub fn connect_v311(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// Reads until EOF or error; true if the peer closed the connection.
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Writes, ignoring a peer that already closed.
pub fn send(s: &mut TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}

/// A deterministic byte generator (xorshift), so a failing fuzz case can be replayed.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Debian's `mosquitto` on a free loopback port (MQTT 3.1.1 and 5, anonymous, no persistence).
pub struct Mosquitto {
    pub _proc: Proc,
    pub addr: SocketAddr,
    dir: TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        let port = free_port();
        let dir = TempDir::new("mosquitto");
        let conf = dir.file(
            "mosquitto.conf",
            &format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
                 persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n\
                 log_type notice\nlog_type information\n"
            ),
        );
        Mosquitto {
            _proc: Mosquitto::run(&conf),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        }
    }

    fn run(conf: &Path) -> Proc {
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(conf);
        let proc = Proc::spawn(cmd);
        proc.expect_line(" running", Duration::from_secs(10));
        proc
    }

    /// SIGKILLs it and waits for its end.
    pub fn kill(&mut self) {
        self._proc.signal("KILL");
        self._proc.wait_exit(Duration::from_secs(5));
    }

    /// Starts it again on the same port, after [`Mosquitto::kill`].
    pub fn start_again(&mut self) {
        self._proc = Mosquitto::run(&self.dir.0.join("mosquitto.conf"));
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The address in the `edgebus broker listening on ADDR` line `proc` prints (`broker`, `up`).
pub fn broker_addr(proc: &Proc) -> SocketAddr {
    listening(proc, "edgebus broker listening on ")
}

/// The address of a `{what} ADDR` line the broker prints at start (`edgebus TLS listening
/// on `, `edgebus websocket listening on `), within 10 s.
pub fn listening(proc: &Proc, what: &str) -> SocketAddr {
    let line = proc.expect_line(what, Duration::from_secs(10));
    line.rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in `{line}`"))
}

/// `edgebus up …` (`cmd`) started: the process, and the broker's address once it listens;
/// with `ready`, also once every part is ready (`all parts ready`).
pub fn start_up(cmd: Command, ready: bool) -> (Proc, SocketAddr) {
    let proc = Proc::spawn(cmd);
    let addr = broker_addr(&proc);
    if ready {
        proc.expect_line("all parts ready", Duration::from_secs(15));
    }
    (proc, addr)
}

/// `edgebus ARGS… -c CFG --broker ADDR`, one of the bus's parts (`discovery`,
/// `orchestrator`, `health monitor`), started and ready.
pub fn part(args: &[&str], cfg: &Path, broker: SocketAddr) -> Proc {
    let mut cmd = edgebus();
    cmd.args(args)
        .arg("-c")
        .arg(cfg)
        .args(["--broker", &broker.to_string()]);
    let p = Proc::spawn(cmd);
    p.expect_line("ready as", Duration::from_secs(10));
    p
}

/// `edgebus service NAME --broker ADDR [ARGS…]`, started and ready (subscriptions active).
pub struct Service {
    pub _proc: Proc,
    pub instance: String,
}

impl Service {
    pub fn start(name: &str, broker: SocketAddr, args: &[&str]) -> Service {
        let mut cmd = edgebus();
        cmd.args(["service", name, "--broker", &broker.to_string()])
            .args(args);
        let proc = Proc::spawn(cmd);
        let line = proc.expect_line("ready as", Duration::from_secs(10));
        let instance = line.rsplit(' ').next().unwrap_or_default().to_owned();
        Service {
            _proc: proc,
            instance,
        }
    }
}

/// Runs `mosquitto_rr` (MQTT 5) to completion; returns success and stdout+stderr.
pub fn rr(port: &str, args: &[&str]) -> (bool, String) {
    run_tool("mosquitto_rr", port, args)
}

/// Parses the JSON after `topic ` in a `Sub` line.
pub fn json_of(line: &str) -> serde_json::Value {
    let body = line.split_once(' ').map_or(line, |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// The broker's latest retained stats record.
pub fn broker_stats(port: &str) -> serde_json::Value {
    let (_, out) = run_tool(
        "mosquitto_sub",
        port,
        &["-t", "edge/system/broker/stats", "-C", "1", "-W", "5"],
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("stats ({e}): {out}"))
}

/// Waits (bounded) until `check` holds for the broker's stats record; returns that record.
pub fn wait_stats(
    port: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = broker_stats(port);
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "stats never showed {what}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A password file written by `edgebus passwd`, with these users.
pub fn password_file(dir: &TempDir, users: &[(&str, &str)]) -> PathBuf {
    let pw = dir.0.join("passwd");
    for (user, pass) in users {
        let st = edgebus()
            .args([
                "passwd",
                pw.to_str().expect("utf-8"),
                user,
                "--password",
                pass,
            ])
            .status()
            .expect("edgebus passwd");
        assert!(st.success());
    }
    pw
}

/// Hand-made MQTT packets, for what no client library will send.
pub mod packet {
    use std::io::Read;
    use std::net::TcpStream;

    /// A remaining length as a variable byte integer.
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                return;
            }
        }
    }

    /// A packet from its first byte and body.
    pub fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![byte1];
        varint(body.len(), &mut p);
        p.extend_from_slice(body);
        p
    }

    /// A length-prefixed string or binary field.
    pub fn field(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    /// An MQTT 5 property list from its bytes.
    pub fn props(b: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        varint(b.len(), &mut v);
        v.extend_from_slice(b);
        v
    }

    /// What goes into a CONNECT.
    #[derive(Default, Clone)]
    pub struct Connect<'a> {
        pub v5: bool,
        pub client_id: &'a str,
        pub keep_alive: u16,
        /// Persistent session (clean session / clean start 0).
        pub persistent: bool,
        /// Will topic and payload, and whether it is retained.
        pub will: Option<(&'a [u8], &'a [u8], bool)>,
        /// Will properties (MQTT 5), as bytes.
        pub will_props: &'a [u8],
        pub username: Option<&'a str>,
        pub password: Option<&'a str>,
        /// CONNECT properties (MQTT 5), as bytes.
        pub props: &'a [u8],
        /// Flag bits ORed in as they are (to set the reserved one).
        pub extra_flags: u8,
    }

    impl Connect<'_> {
        pub fn bytes(&self) -> Vec<u8> {
            let mut flags = self.extra_flags;
            if !self.persistent {
                flags |= 0x02;
            }
            if let Some((_, _, retain)) = self.will {
                flags |= 0x04 | if retain { 0x20 } else { 0 };
            }
            if self.username.is_some() {
                flags |= 0x80;
            }
            if self.password.is_some() {
                flags |= 0x40;
            }
            let mut body = field(b"MQTT");
            body.push(if self.v5 { 5 } else { 4 });
            body.push(flags);
            body.extend_from_slice(&self.keep_alive.to_be_bytes());
            if self.v5 {
                body.extend(props(self.props));
            }
            body.extend(field(self.client_id.as_bytes()));
            if let Some((topic, payload, _)) = self.will {
                if self.v5 {
                    body.extend(props(self.will_props));
                }
                body.extend(field(topic));
                body.extend(field(payload));
            }
            if let Some(u) = self.username {
                body.extend(field(u.as_bytes()));
            }
            if let Some(p) = self.password {
                body.extend(field(p.as_bytes()));
            }
            frame(0x10, &body)
        }
    }

    /// A SUBSCRIBE of `filters` (each with its options byte).
    pub fn subscribe(v5: bool, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if v5 {
            body.push(0);
        }
        for (f, o) in filters {
            body.extend(field(f.as_bytes()));
            body.push(*o);
        }
        frame(0x82, &body)
    }

    /// A PUBLISH (MQTT 5 ones with no properties unless `props` says so).
    pub fn publish(
        v5: bool,
        qos: u8,
        pkid: u16,
        topic: &[u8],
        props_: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = field(topic);
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if v5 {
            body.extend(props(props_));
        }
        body.extend_from_slice(payload);
        frame(0x30 | (qos << 1), &body)
    }

    /// Reads one packet: its first byte and body; None on EOF, error or timeout.
    pub fn read(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let mut b1 = [0u8; 1];
        s.read_exact(&mut b1).ok()?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).ok()?;
            len |= usize::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).ok()?;
        Some((b1[0], body))
    }

    /// Reads packets until one of type `kind` (high nibble); others are skipped.
    pub fn read_kind(s: &mut TcpStream, kind: u8) -> Option<(u8, Vec<u8>)> {
        loop {
            let p = read(s)?;
            if p.0 >> 4 == kind {
                return Some(p);
            }
        }
    }
}

/// What a finished `edgebus` command left.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// Runs `edgebus ARGS…` with `stdin`, killed if it runs past `timeout` (then a panic).
pub fn run_edgebus(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Output {
    run_command(edgebus(), args, stdin, timeout)
}

/// Runs `cmd ARGS…` with `stdin`, killed if it runs past `timeout` (then a panic).
pub fn run_command(
    mut cmd: Command,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Output {
    let t0 = Instant::now();
    let mut child = cmd
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} {args:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = t0.elapsed();
    Output {
        ok: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        took,
    }
}
