//! Running under systemd: readiness, a status line, and a watchdog that only pings while the
//! process's own loops are healthy (sd_notify(3) and the service manager's notify protocol).
//!
//! A unit with `Type=notify` and `WatchdogSec=` starts a part and waits for `READY=1`; after
//! that it kills and restarts the part when `WATCHDOG=1` stops arriving. The [`Supervisor`]
//! sends `WATCHDOG=1` from a thread of its own, and only after every [`Probe`] passed: a
//! wedged tokio runtime (every worker blocked) or a stuck bus event loop stops the pings, and
//! systemd restarts the part. `STATUS=` carries a one-line summary that `systemctl status`
//! shows.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) everything here is a no-op and no thread starts.
//!
//! ```no_run
//! # async fn f(service: edgebus_runtime::service::Service) {
//! // After the service started: READY once it is connected and registered, then the watchdog.
//! let _supervisor = edgebus_runtime::systemd::serve_service(&service).await;
//! # }
//! ```

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::Bus;
use crate::service::Service;

/// Where notifications go: the service manager's socket, or nowhere.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug, Clone)]
enum Target {
    Path(PathBuf),
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

impl Notifier {
    /// The socket named by `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket); a
    /// no-op notifier when it is unset.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            let s = s.into_encoded_bytes();
            match s.first() {
                #[cfg(target_os = "linux")]
                Some(b'@') => Some(Target::Abstract(s[1..].to_vec())),
                Some(b'/') => Some(Target::Path(PathBuf::from(
                    <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(s),
                ))),
                _ => None,
            }
        });
        Notifier { target }
    }

    /// A notifier that sends to the datagram socket at `path` (tests play systemd with it).
    pub fn to_path(path: impl Into<PathBuf>) -> Notifier {
        Notifier {
            target: Some(Target::Path(path.into())),
        }
    }

    /// A notifier that sends nothing.
    pub fn none() -> Notifier {
        Notifier { target: None }
    }

    /// Whether a service manager listens.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification, `KEY=VALUE` lines (a no-op without a service manager).
    pub fn send(&self, state: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        match target {
            Target::Path(p) => socket.send_to(state.as_bytes(), p).map(drop),
            #[cfg(target_os = "linux")]
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr).map(drop)
            }
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.log(self.send(&format!("READY=1\nSTATUS={}", one_line(status))));
    }

    /// `STATUS=…`, shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.log(self.send(&format!("STATUS={}", one_line(status))));
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.log(self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status))));
    }

    fn log(&self, r: io::Result<()>) {
        if let Err(e) = r {
            tracing::warn!(error = %e, socket = ?self.target, "notification to the service manager failed");
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The watchdog timeout the service manager asked for (`WATCHDOG_USEC`, for this process as
/// `WATCHDOG_PID` says), if any.
pub fn watchdog_timeout_from_env() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// One health check the watchdog runs before each ping: `Ok` when healthy, else why not. It
/// runs on the supervisor's thread and must return within about `budget`.
pub type Probe = Box<dyn Fn(Duration) -> Result<(), String> + Send>;

/// A one-line status, asked for at each supervisor tick.
pub type StatusFn = Box<dyn Fn() -> String + Send>;

/// Checks that `handle`'s runtime runs a new task within the budget: fails when every worker
/// is blocked (a handler doing blocking work, a deadlock).
pub fn runtime_probe(handle: tokio::runtime::Handle) -> Probe {
    Box::new(move |budget| {
        let (tx, rx) = mpsc::sync_channel(1);
        handle.spawn(async move {
            let _ = tx.send(());
        });
        rx.recv_timeout(budget).map_err(|_| {
            format!(
                "the runtime did not run a task within {} ms (every worker blocked?)",
                budget.as_millis()
            )
        })
    })
}

/// Checks that `bus`'s event loop is being driven (see [`Bus::event_loop_stalled`]).
pub fn bus_probe(bus: &Bus) -> Probe {
    let bus = bus.clone();
    Box::new(move |_| match bus.event_loop_stalled() {
        None => Ok(()),
        Some(d) => Err(format!(
            "the bus event loop of {} has not run for {} s",
            bus.client_id(),
            d.as_secs()
        )),
    })
}

/// Sends `WATCHDOG=1` while every probe passes, and `STATUS=` when the status line changes.
pub struct Supervisor {
    notifier: Notifier,
    watchdog: Option<Duration>,
    status_every: Duration,
    probes: Vec<(String, Probe)>,
    status: Option<StatusFn>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("notifier", &self.notifier)
            .field("watchdog", &self.watchdog)
            .field(
                "probes",
                &self.probes.iter().map(|p| &p.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Supervisor {
    /// A supervisor for this process as systemd started it (`NOTIFY_SOCKET`, `WATCHDOG_USEC`).
    pub fn from_env() -> Supervisor {
        Supervisor::new(Notifier::from_env(), watchdog_timeout_from_env())
    }

    /// A supervisor sending to `notifier`, pinging within `watchdog` (half of it between
    /// pings, as sd_watchdog_enabled(3) advises) when given.
    pub fn new(notifier: Notifier, watchdog: Option<Duration>) -> Supervisor {
        Supervisor {
            notifier,
            watchdog,
            status_every: Duration::from_secs(10),
            probes: Vec::new(),
            status: None,
        }
    }

    /// How often the status line is refreshed when no watchdog is set (default 10 s).
    pub fn status_every(mut self, every: Duration) -> Self {
        self.status_every = every;
        self
    }

    /// Adds a probe; every probe must pass for a ping.
    pub fn probe(mut self, name: impl Into<String>, probe: Probe) -> Self {
        self.probes.push((name.into(), probe));
        self
    }

    /// Sets the status line source.
    pub fn status(mut self, status: impl Fn() -> String + Send + 'static) -> Self {
        self.status = Some(Box::new(status));
        self
    }

    /// The notifier.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Sends `READY=1` with the current status, and starts the thread that pings the
    /// watchdog and refreshes the status. Without a service manager it does nothing.
    pub fn ready(self) -> SupervisorHandle {
        let notifier = self.notifier.clone();
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        if !notifier.is_enabled() {
            return SupervisorHandle {
                notifier,
                stop,
                thread: None,
            };
        }
        let status = self.status.as_ref().map_or_else(String::new, |s| s());
        notifier.ready(&status);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("edgebus-watchdog".into())
                .spawn(move || self.run(status, &stop))
                .ok()
        };
        SupervisorHandle {
            notifier,
            stop,
            thread,
        }
    }

    fn run(self, mut last_status: String, stop: &(Mutex<bool>, std::sync::Condvar)) {
        let tick = self.watchdog.map_or(self.status_every, |w| {
            (w / 2).max(Duration::from_millis(10))
        });
        // Each probe gets a share of the tick, so that a ping still goes out in time.
        let budget = (tick / 2).min(Duration::from_secs(5));
        let mut failing: Option<String> = None;
        loop {
            let next = Instant::now() + tick;
            let mut problem = None;
            if self.watchdog.is_some() {
                for (name, probe) in &self.probes {
                    if let Err(why) = probe(budget) {
                        problem = Some(format!("{name}: {why}"));
                        break;
                    }
                }
            }
            // No ping after STOPPING=1, even when asked while the probes ran.
            if *stop.0.lock().unwrap_or_else(|e| e.into_inner()) {
                return;
            }
            match &problem {
                None => {
                    if self.watchdog.is_some() {
                        if let Err(e) = self.notifier.send("WATCHDOG=1") {
                            tracing::warn!(error = %e, "watchdog ping failed");
                        }
                    }
                    if let Some(was) = failing.take() {
                        tracing::info!(was = %was, "healthy again; watchdog pings resumed");
                    }
                }
                Some(p) => {
                    if failing.as_deref() != Some(p.as_str()) {
                        tracing::error!(problem = %p, "unhealthy; watchdog pings withheld");
                        failing = Some(p.clone());
                    }
                }
            }
            let mut status = self.status.as_ref().map_or_else(String::new, |s| s());
            if let Some(p) = &problem {
                status = format!("UNHEALTHY ({p}); {status}");
            }
            if status != last_status {
                self.notifier.status(&status);
                last_status = status;
            }
            let (lock, cvar) = stop;
            let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !*stopped {
                let now = Instant::now();
                if now >= next {
                    break;
                }
                stopped = cvar
                    .wait_timeout(stopped, next - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if *stopped {
                return;
            }
        }
    }
}

/// The running supervisor; [`SupervisorHandle::stopping`] (or dropping it) ends it.
#[derive(Debug)]
pub struct SupervisorHandle {
    notifier: Notifier,
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SupervisorHandle {
    /// Tells the service manager the process is stopping, and ends the pings.
    pub fn stopping(mut self, status: &str) {
        self.notifier.stopping(status);
        self.end();
    }

    fn end(&mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SupervisorHandle {
    fn drop(&mut self) {
        self.end();
    }
}

/// A one-line summary of a service: connection, endpoints, requests, errors, p99.
pub fn service_status(service: &Service) -> String {
    let bus = service.bus();
    let s = service.total_stats();
    let conn = if bus.is_connected() {
        format!("connected to {}", bus.options().broker)
    } else {
        format!("RECONNECTING to {}", bus.options().broker)
    };
    let endpoints = service.spec().endpoints.len();
    let mut line = format!("{} {}: {conn}", service.name(), service.instance());
    // Parts without endpoints (the health monitor, the orchestrator) have no requests to count.
    if endpoints > 0 {
        line.push_str(&format!(
            "; {endpoints} endpoint{}, {} requests, {} errors",
            if endpoints == 1 { "" } else { "s" },
            s.requests,
            s.errors,
        ));
    }
    if s.requests > 0 {
        line.push_str(&format!(", p99 {:.1} ms", s.p99_ms));
    }
    let open: Vec<String> = bus
        .circuits()
        .into_iter()
        .filter(|(_, c)| c.state != crate::policy::CircuitState::Closed)
        .map(|(t, c)| format!("{t} {}", c.state))
        .collect();
    if !open.is_empty() {
        line.push_str(&format!("; circuits: {}", open.join(", ")));
    }
    line
}

/// The supervisor for one service: probes its runtime (the current one) and its bus, and
/// reports [`service_status`].
pub fn service_supervisor(service: &Service) -> Supervisor {
    let s = service.clone();
    Supervisor::from_env()
        .probe("runtime", runtime_probe(tokio::runtime::Handle::current()))
        .probe("bus", bus_probe(service.bus()))
        .status(move || service_status(&s))
}

/// Waits until `service` is connected and registered (its subscriptions active at the
/// broker), then sends `READY=1` and starts the watchdog. Call it after
/// [`crate::service::ServiceBuilder::start`]; keep the handle while the service runs.
pub async fn serve_service(service: &Service) -> SupervisorHandle {
    while !service.bus().sync(Duration::from_secs(2)).await {}
    service_supervisor(service).ready()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn notifies_a_socket_and_pings_only_while_healthy() {
        let dir = std::env::temp_dir().join(format!("edgebus-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let handle = Supervisor::new(Notifier::to_path(&path), Some(Duration::from_millis(100)))
            .probe(
                "flag",
                Box::new(move |_| {
                    if h.load(Ordering::Relaxed) {
                        Ok(())
                    } else {
                        Err("flag down".into())
                    }
                }),
            )
            .status(|| "all good".into())
            .ready();
        let recv = || {
            let mut buf = [0u8; 512];
            let n = listener.recv(&mut buf).expect("a notification");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let mut buf = [0u8; 512];
        assert_eq!(recv(), "READY=1\nSTATUS=all good");
        assert_eq!(recv(), "WATCHDOG=1");
        healthy.store(false, Ordering::Relaxed);
        // Drain until the status says why; after that, no ping.
        let mut saw_unhealthy = false;
        for _ in 0..5 {
            let m = recv();
            if m.starts_with("STATUS=UNHEALTHY (flag: flag down)") {
                saw_unhealthy = true;
                break;
            }
        }
        assert!(saw_unhealthy);
        listener
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        assert!(listener.recv(&mut buf).is_err(), "no ping while unhealthy");
        healthy.store(true, Ordering::Relaxed);
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut saw_ping = false;
        for _ in 0..3 {
            if recv() == "WATCHDOG=1" {
                saw_ping = true;
                break;
            }
        }
        assert!(saw_ping);
        handle.stopping("bye");
        let mut last = String::new();
        while let Ok(n) = listener.recv(&mut buf) {
            last = String::from_utf8_lossy(&buf[..n]).into_owned();
            if last.starts_with("STOPPING=1") {
                break;
            }
        }
        assert_eq!(last, "STOPPING=1\nSTATUS=bye");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn watchdog_env_is_read_for_this_process_only() {
        // Read-only checks of the parsing helper's contract on the current environment.
        if std::env::var_os("WATCHDOG_USEC").is_none() {
            assert_eq!(watchdog_timeout_from_env(), None);
        }
        assert!(!Notifier::none().is_enabled());
    }
}
