//! The host the bench runs on: the brokers it starts and signals, their memory, its limits,
//! and its description for the record.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use super::Target;

/// A child process SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Raises this process's open-file limit to at least `n` (up to the hard limit).
#[allow(unsafe_code)]
pub fn raise_fd_limit(n: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && (lim.rlim_cur as usize) < n {
            lim.rlim_cur = (n as libc::rlim_t).min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Resident set size of `pid` in KiB, or why it cannot be read.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    rss_kib(pid).ok_or_else(|| anyhow!("no /proc for pid {pid}"))
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sends `sig` (`STOP`, `CONT`, …) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?
        .success();
    if !ok {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// An `edgebus broker` (this executable) on a free loopback port, for `max_connections`
/// connections, with `threads` router threads.
pub fn spawn_embedded(
    max_connections: usize,
    threads: usize,
) -> anyhow::Result<(Spawned, SocketAddr, SocketAddr)> {
    let exe = std::env::current_exe()?;
    // The defaults, but for as many connections as the memory scenario holds, all from one
    // loopback client (its own user: let in beyond the per-address limit, but each one past it
    // would cost a read of the kernel's socket table).
    let dir = std::env::temp_dir().join(format!("edgebus-bench-{}-{threads}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("topics.toml");
    let tls = tls_files()?;
    std::fs::write(
        &conf,
        format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\nmax_connections = {max_connections}\n\
             max_connections_per_address = {max_connections}\nthreads = {threads}\n\
             [broker.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
            tls.cert.display(),
            tls.key.display()
        ),
    )?;
    let mut child = Command::new(exe)
        .arg("broker")
        .arg("-c")
        .arg(&conf)
        .env("EDGEBUS_LOG", "error,rumqttd=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting edgebus broker")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let spawned = Spawned(child);
    let mut out = BufReader::new(stdout);
    let mut address = || -> anyhow::Result<SocketAddr> {
        let mut line = String::new();
        out.read_line(&mut line)?;
        line.trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("edgebus broker printed `{}`", line.trim()))
    };
    let addr = address()?;
    let tls = address()?;
    Ok((spawned, addr, tls))
}

/// A CA and a server certificate for localhost (ECDSA P-256), made with openssl once per
/// run, for the TLS listeners of the brokers started here.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// See [`TlsFiles`].
pub fn tls_files() -> anyhow::Result<TlsFiles> {
    let dir = std::env::temp_dir().join(format!("edgebus-bench-tls-{}", std::process::id()));
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    if files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=bench CA",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .current_dir(&dir)
            .args(&args)
            .output()
            .context("openssl (apt-get install openssl)")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    // mosquitto reads the key as its own user.
    std::fs::set_permissions(
        &files.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    Ok(files)
}

/// Debian's `mosquitto` on a free loopback port, configured as the README's comparison says.
pub fn spawn_mosquitto() -> anyhow::Result<(Spawned, SocketAddr, SocketAddr)> {
    let free = || -> std::io::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (port, tls_port) = (free()?, free()?);
    let tls = tls_files()?;
    let dir = std::env::temp_dir().join(format!("edgebus-bench-mosquitto-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
             persistence false\nmax_connections -1\n\
             listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
            tls.cert.display(),
            tls.key.display()
        ),
    )?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (apt-get install mosquitto)")?;
    let spawned = Spawned(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err()
        || std::net::TcpStream::connect(tls_addr).is_err()
    {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("mosquitto did not listen on {addr} and {tls_addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((spawned, addr, tls_addr))
}

/// The machine and versions a run was made on, as Markdown lines.
pub fn environment(targets: &[Target]) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/debian_version")
        .map(|v| format!("Debian {}", v.trim()))
        .unwrap_or_else(|_| "Linux".into());
    let mosquitto = std::process::Command::new("mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let mut s = format!(
        "- machine: {cpu}, {cores} cores, {:.1} GiB, {os}, Linux {}\n- edgebus {} (release build), rumqttd 0.20, rumqttc 0.25 clients with TCP_NODELAY\n",
        mem_kib / (1024.0 * 1024.0),
        kernel.trim(),
        env!("CARGO_PKG_VERSION"),
    );
    if targets.iter().any(|t| t.name == "mosquitto") && !mosquitto.is_empty() {
        s.push_str(&format!(
            "- {mosquitto}, `set_tcp_nodelay true`, `max_connections -1`\n"
        ));
    }
    s.push_str(&format!(
        "- run at {at}, all brokers in the same run, loopback\n"
    ));
    s
}
