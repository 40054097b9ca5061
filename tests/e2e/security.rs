//! The bus on a broker that asks who is there: every part, `edgebus call` and the views
//! connect with the bus's credentials (topics.toml `[bus]` and the environment, never the
//! command line).

use std::time::Duration;

use crate::harness::*;

const T: Duration = Duration::from_secs(10);

/// A topics.toml for `edgebus up` on a free port, with a password file that knows `bus`
/// and `alice`, anonymous clients refused, and `[bus]` connecting as `bus` with its password
/// in `bus.password`.
fn guarded(dir: &TempDir) -> std::path::PathBuf {
    let users = password_file(dir, &[("bus", "bus-secret"), ("alice", "alice-pw")]);
    let secret = dir.file("bus.password", "bus-secret\n");
    dir.file(
        "topics.toml",
        &format!(
            "[bus]\nusername = \"bus\"\npassword_file = \"{}\"\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n\
             [broker.auth]\npassword_file = \"{}\"\nanonymous = \"deny\"\n",
            secret.display(),
            users.display()
        ),
    )
}

#[test]
fn the_whole_bus_runs_on_a_broker_with_a_password_file() {
    let dir = TempDir::new("guarded");
    let cfg = guarded(&dir);
    let c = cfg.to_str().expect("utf-8");
    let check = run_edgebus(&["check-config", "-c", c], None, T);
    assert!(check.ok, "{}{}", check.stdout, check.stderr);
    // Every part connects as `bus`: without its credentials none would be ready.
    let mut cmd = edgebus();
    cmd.args(["up", "-c", c]);
    let (_up, addr) = start_up(cmd, true);
    let broker = addr.to_string();
    let port = addr.port().to_string();

    // `edgebus call` and the views take the credentials from [bus].
    let call = run_edgebus(
        &[
            "call",
            "echo/echo",
            r#"{"hi":1}"#,
            "-c",
            c,
            "--broker",
            &broker,
        ],
        None,
        T,
    );
    assert!(call.ok, "{}{}", call.stdout, call.stderr);
    assert!(call.stdout.contains(r#""hi":1"#), "{}", call.stdout);
    let services = run_edgebus(&["services", "-c", c, "--broker", &broker], None, T);
    assert!(services.ok, "{}{}", services.stdout, services.stderr);
    assert!(services.stdout.contains("discovery"), "{}", services.stdout);

    // The environment wins over [bus]: another user, then a wrong password.
    let mut as_alice = edgebus();
    as_alice
        .env("EDGEBUS_USERNAME", "alice")
        .env("EDGEBUS_PASSWORD", "alice-pw");
    let call = run_command(
        as_alice,
        &["call", "echo/echo", "{}", "-c", c, "--broker", &broker],
        None,
        T,
    );
    assert!(call.ok, "{}{}", call.stdout, call.stderr);
    let mut wrong = edgebus();
    wrong
        .env("EDGEBUS_USERNAME", "alice")
        .env("EDGEBUS_PASSWORD", "guess");
    let call = run_command(
        wrong,
        &["call", "echo/echo", "{}", "-c", c, "--broker", &broker],
        None,
        T,
    );
    assert!(!call.ok, "a wrong password is refused");
    assert!(
        call.stderr.to_lowercase().contains("refused")
            || call.stderr.to_lowercase().contains("not authorized")
            || call.stderr.to_lowercase().contains("password"),
        "the reason is said: {}",
        call.stderr
    );

    // mosquitto's clients, with a user of the password file.
    let (ok, out) = rr(
        &port,
        &[
            "-u",
            "alice",
            "-P",
            "alice-pw",
            "-t",
            "edge/echo/echo/request",
            "-e",
            "test/reply",
            "-m",
            r#"{"from":"rr"}"#,
            "-W",
            "5",
        ],
    );
    assert!(ok && out.contains(r#""from":"rr""#), "{out}");
    let (ok, out) = rr(
        &port,
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "test/reply",
            "-m",
            "{}",
            "-W",
            "2",
        ],
    );
    assert!(!ok, "anonymous is refused: {out}");
}

#[test]
fn an_unreadable_bus_password_is_a_config_error_naming_its_key() {
    let dir = TempDir::new("nopw");
    let cfg = dir.file(
        "topics.toml",
        "[bus]\nusername = \"bus\"\npassword_file = \"/nonexistent/edgebus-bus.password\"\n",
    );
    let out = run_edgebus(
        &["check-config", "-c", cfg.to_str().expect("utf-8")],
        None,
        T,
    );
    assert!(!out.ok);
    assert!(
        out.stderr.contains("bus.password_file") && out.stderr.contains("/nonexistent"),
        "{}",
        out.stderr
    );
}

/// Runs openssl with `args` in `dir`; panics with its output if it fails.
pub(crate) fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `{name}-ca.pem`, and a certificate `{name}-{who}.pem` (key `{name}-{who}.key`)
/// signed by it for each of `who`: `server` for localhost and 127.0.0.1, anything else a
/// client certificate with that common name.
fn pki(dir: &TempDir, name: &str, who: &[&str]) {
    let d = &dir.0;
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-days",
            "2",
            "-subj",
            &format!("/CN=edgebus test CA {name}"),
        ],
    );
    for w in who {
        let key = format!("{name}-{w}.key");
        let csr = format!("{name}-{w}.csr");
        let pem = format!("{name}-{w}.pem");
        let ext = format!("{name}-{w}.ext");
        let (cn, text) = if *w == "server" {
            (
                "localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                 extendedKeyUsage=serverAuth\n",
            )
        } else {
            (
                *w,
                "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
            )
        };
        dir.file(&ext, text);
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// `edgebus broker` with a TLS listener (certificate of `name`, and mTLS with `client_ca`
/// when given); returns it with its plain and TLS ports.
fn tls_broker(dir: &TempDir, name: &str, client_ca: Option<&str>) -> (Proc, String, String) {
    let d = dir.0.display();
    let ca_line = client_ca
        .map(|c| format!("client_ca = \"{d}/{c}\"\n"))
        .unwrap_or_default();
    let cfg = dir.file(
        "tls.toml",
        &format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n\
             connect_timeout = \"2s\"\n\
             [broker.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{d}/tls-server.pem\"\n\
             key = \"{d}/tls-server.key\"\n{ca_line}"
        ),
    );
    for f in ["pem", "key"] {
        std::fs::copy(
            dir.0.join(format!("{name}-server.{f}")),
            dir.0.join(format!("tls-server.{f}")),
        )
        .expect("copy");
    }
    let mut cmd = edgebus();
    cmd.args(["broker", "-c", cfg.to_str().expect("utf-8")]);
    let p = Proc::spawn(cmd);
    let plain = broker_addr(&p).port().to_string();
    let tls = listening(&p, "edgebus TLS listening on ")
        .port()
        .to_string();
    (p, plain, tls)
}

/// A mosquitto client over TLS to localhost:`port`, trusting `ca` (in `dir`).
fn tls_tool(dir: &TempDir, tool: &str, port: &str, ca: &str, args: &[&str]) -> (bool, String) {
    let ca = dir.0.join(ca);
    let mut all = vec!["-h", "localhost", "--cafile", ca.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    run_tool(tool, port, &all)
}

#[test]
fn mosquitto_clients_speak_mqtt_over_tls() {
    let dir = TempDir::new("tls");
    pki(&dir, "one", &["server"]);
    pki(&dir, "other", &["server"]);
    let (_b, plain, tls) = tls_broker(&dir, "one", None);
    let ca = dir.0.join("one-ca.pem");
    let ca = ca.to_str().expect("utf-8");
    let sub = Sub::start(&tls, &["-h", "localhost", "--cafile", ca, "-t", "tls/#"]);
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "one-ca.pem",
        &["-t", "tls/a", "-m", "sealed", "-q", "1"],
    );
    assert!(ok, "{out}");
    assert_eq!(sub.next(T).as_deref(), Some("tls/a sealed"));
    // Request/response over TLS, answered by a service on the plain listener.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{plain}").parse().expect("addr");
    let _echo = Service::start("echo", addr, &[]);
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_rr",
        &tls,
        "one-ca.pem",
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "rr/reply",
            "-m",
            r#"{"over":"tls"}"#,
            "-W",
            "5",
        ],
    );
    assert!(ok && out.contains(r#""over":"tls""#), "{out}");
    // A client that trusts another CA refuses the server; the broker logs the failure.
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "other-ca.pem",
        &["-t", "tls/x", "-m", "x"],
    );
    assert!(!ok, "a wrong CA must not connect: {out}");
    // A plain MQTT client on the TLS port is closed, and the listener goes on.
    let mut s = raw(format!("127.0.0.1:{tls}").parse().expect("addr"));
    send(&mut s, &connect_v311("plain-on-tls", 30));
    assert!(
        closed_by_peer(&mut s),
        "plain MQTT on the TLS port is closed"
    );
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "one-ca.pem",
        &["-t", "tls/b", "-m", "still"],
    );
    assert!(ok, "{out}");
    assert_eq!(sub.next(T).as_deref(), Some("tls/b still"));
}

/// 200 connections that never start their TLS handshake do not hold up a client that does;
/// each is closed once `connect_timeout` (2 s here) has passed.
#[test]
fn stalled_tls_handshakes_hold_up_nobody() {
    let dir = TempDir::new("tls-stall");
    pki(&dir, "one", &["server"]);
    let (_b, _plain, tls) = tls_broker(&dir, "one", None);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{tls}").parse().expect("addr");
    let stalled: Vec<_> = (0..200).map(|_| raw(addr)).collect();
    let t0 = std::time::Instant::now();
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "one-ca.pem",
        &["-t", "s/a", "-m", "through", "-q", "1"],
    );
    assert!(ok, "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "a TLS client waited {:?} behind 200 stalled handshakes",
        t0.elapsed()
    );
    let mut first = stalled.into_iter().next().expect("one");
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(
        closed_by_peer(&mut first),
        "a stalled handshake is closed after connect_timeout"
    );
}

/// mTLS: with `client_ca`, a client without a certificate from that CA is refused in the
/// handshake; one with it connects.
#[test]
fn client_certificates_are_required_when_a_client_ca_is_set() {
    let dir = TempDir::new("mtls");
    pki(&dir, "one", &["server", "alice"]);
    pki(&dir, "rogue", &["mallory"]);
    let (_b, _plain, tls) = tls_broker(&dir, "one", Some("one-ca.pem"));
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "one-ca.pem",
        &["-t", "m/a", "-m", "x"],
    );
    assert!(!ok, "no client certificate: refused: {out}");
    let d = &dir.0;
    let cert = |n: &str| d.join(n).display().to_string();
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "one-ca.pem",
        &[
            "--cert",
            &cert("rogue-mallory.pem"),
            "--key",
            &cert("rogue-mallory.key"),
            "-t",
            "m/a",
            "-m",
            "x",
        ],
    );
    assert!(!ok, "a certificate from another CA: refused: {out}");
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "one-ca.pem",
        &[
            "--cert",
            &cert("one-alice.pem"),
            "--key",
            &cert("one-alice.key"),
            "-t",
            "m/a",
            "-m",
            "x",
        ],
    );
    assert!(ok, "{out}");
}

/// A renewed certificate is taken up on SIGHUP without dropping anyone: a subscriber
/// connected with the old one keeps receiving, a new client sees the new one.
#[test]
fn a_certificate_replaced_and_sighup_keeps_clients_and_serves_the_new_one() {
    let dir = TempDir::new("tls-reload");
    pki(&dir, "old", &["server"]);
    pki(&dir, "new", &["server"]);
    let (b, plain, tls) = tls_broker(&dir, "old", None);
    let ca = dir.0.join("old-ca.pem");
    let ca = ca.to_str().expect("utf-8");
    let sub = Sub::start(&tls, &["-h", "localhost", "--cafile", ca, "-t", "r/#"]);
    for f in ["pem", "key"] {
        std::fs::copy(
            dir.0.join(format!("new-server.{f}")),
            dir.0.join(format!("tls-server.{f}")),
        )
        .expect("replace");
    }
    b.signal("HUP");
    b.expect_line("TLS certificate and key read again", T);
    let (ok, out) = publish(&plain, &["-t", "r/a", "-m", "after"]);
    assert!(ok, "{out}");
    assert_eq!(
        sub.next(T).as_deref(),
        Some("r/a after"),
        "the old connection stays"
    );
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "new-ca.pem",
        &["-t", "r/b", "-m", "new"],
    );
    assert!(ok, "a new client sees the new certificate: {out}");
    let (ok, out) = tls_tool(
        &dir,
        "mosquitto_pub",
        &tls,
        "old-ca.pem",
        &["-t", "r/c", "-m", "old"],
    );
    assert!(!ok, "the old certificate is no longer served: {out}");
}

/// No client can write the names the broker vouches with: they are removed from every
/// PUBLISH, a request or not, and a request gets the real ones.
#[test]
fn forged_identity_properties_are_removed() {
    let b = Broker::start();
    let port = b.port();
    let mut cmd = std::process::Command::new("stdbuf");
    cmd.args(["-oL", "mosquitto_sub", "-d", "-p", &port, "-V", "mqttv5"])
        .args(["-F", "MSG %t %P", "-t", "plain/#", "-t", "edge/+/+/request"]);
    let sub = Sub(Proc::spawn(cmd));
    sub.0.expect_line("received SUBACK", T);
    let forged = [
        "-V",
        "mqttv5",
        "-i",
        "liar",
        "-D",
        "publish",
        "user-property",
        "edgebus-user",
        "root",
        "-D",
        "publish",
        "user-property",
        "edgebus-client-id",
        "someone",
        "-D",
        "publish",
        "user-property",
        "kept",
        "yes",
        "-m",
        "{}",
    ];
    let (ok, out) = publish(&port, &[&["-t", "plain/x"][..], &forged[..]].concat());
    assert!(ok, "{out}");
    assert_eq!(sub.next(T).as_deref(), Some("plain/x kept:yes"));
    let (ok, out) = publish(
        &port,
        &[&["-t", "edge/svc/ep/request"][..], &forged[..]].concat(),
    );
    assert!(ok, "{out}");
    let got = sub.next(T).expect("the request");
    assert!(
        got.contains("kept:yes") && got.contains("edgebus-client-id:liar"),
        "{got}"
    );
    assert!(
        !got.contains("root") && !got.contains("someone"),
        "forged names removed: {got}"
    );
}

/// The runtime over TLS: a service, `edgebus call` and the views reach a broker at
/// `mqtts://host:port`, trusting the CA `EDGEBUS_CA_FILE` names, with a client certificate
/// when the broker asks for one; a broker whose certificate the CA did not sign is refused.
#[test]
fn the_runtime_speaks_mqtts() {
    let dir = TempDir::new("mqtts");
    pki(&dir, "one", &["server", "svc"]);
    pki(&dir, "other", &["server"]);
    let (_b, _plain, tls) = tls_broker(&dir, "one", Some("one-ca.pem"));
    let url = format!("mqtts://localhost:{tls}");
    let file = |n: &str| dir.0.join(n).display().to_string();
    let with_tls = |cmd: &mut std::process::Command, ca: &str| {
        cmd.env("EDGEBUS_CA_FILE", file(ca))
            .env("EDGEBUS_CERT", file("one-svc.pem"))
            .env("EDGEBUS_KEY", file("one-svc.key"));
    };
    let mut svc = edgebus();
    svc.args(["service", "echo", "--broker", &url]);
    with_tls(&mut svc, "one-ca.pem");
    let _svc = Proc::spawn(svc).expect_ready();
    let mut discovery = edgebus();
    discovery.args(["discovery", "--broker", &url]);
    with_tls(&mut discovery, "one-ca.pem");
    let _discovery = Proc::spawn(discovery).expect_ready();

    let mut call = edgebus();
    with_tls(&mut call, "one-ca.pem");
    let out = run_command(
        call,
        &["call", "echo/echo", r#"{"over":"tls"}"#, "--broker", &url],
        None,
        T,
    );
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(r#""over":"tls""#), "{}", out.stdout);
    let mut services = edgebus();
    with_tls(&mut services, "one-ca.pem");
    let out = run_command(services, &["services", "--broker", &url], None, T);
    assert!(
        out.ok && out.stdout.contains("echo"),
        "{}{}",
        out.stdout,
        out.stderr
    );

    // `edgebus call echo/echo` over TLS, as `cmd` is set up.
    let call_echo = |cmd: std::process::Command| {
        let args = [
            "call",
            "echo/echo",
            "{}",
            "--broker",
            &url,
            "--timeout",
            "3s",
        ];
        run_command(cmd, &args, None, T)
    };
    // Trusting another CA: the broker's certificate is refused, and the reason said.
    let mut call = edgebus();
    with_tls(&mut call, "other-ca.pem");
    let out = call_echo(call);
    assert!(!out.ok, "a broker certificate from another CA was trusted");
    assert!(
        out.stderr.to_lowercase().contains("certificate"),
        "the reason is said: {}",
        out.stderr
    );
    // No client certificate for a broker that asks for one.
    let mut call = edgebus();
    call.env("EDGEBUS_CA_FILE", file("one-ca.pem"));
    assert!(!call_echo(call).ok, "no client certificate, yet served");
    // A CA file that is not there is a config error naming the key.
    let cfg = dir.file(
        "mqtts.toml",
        &format!("[bus]\nbroker = \"{url}\"\nca_file = \"/nonexistent/ca.pem\"\n"),
    );
    let out = run_edgebus(
        &["check-config", "-c", cfg.to_str().expect("utf-8")],
        None,
        T,
    );
    assert!(!out.ok);
    assert!(
        out.stderr.contains("bus.ca_file") && out.stderr.contains("/nonexistent/ca.pem"),
        "{}",
        out.stderr
    );
}

/// The shipped template, examples/secure/topics.toml, with its paths pointed into `dir`
/// and its listeners on free ports.
fn secure_template(dir: &TempDir) -> std::path::PathBuf {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/secure/topics.toml"),
    )
    .expect("examples/secure/topics.toml");
    let d = dir.0.display().to_string();
    let text = text
        .replace(
            "/etc/edgebus/tls/server.pem",
            &format!("{d}/one-server.pem"),
        )
        .replace(
            "/etc/edgebus/tls/server.key",
            &format!("{d}/one-server.key"),
        )
        .replace("/etc/edgebus/", &format!("{d}/"))
        .replace("127.0.0.1:1883", "127.0.0.1:0")
        .replace("0.0.0.0:8883", "127.0.0.1:0");
    dir.file("secure.toml", &text)
}

/// The whole bus on the shipped template: TLS, a password file, anonymous clients refused
/// and the deny-by-default ACL. Every part, a service on its own login over TLS, and a
/// caller do their work and are refused nothing; what each of them may not do is refused
/// and logged: a forged registration, heartbeat, reply, health status, a request without
/// permission, another caller's replies, and anonymous clients. The `order` saga runs
/// through the orchestrator's permission; SIGHUP reloads the certificate.
#[test]
fn the_secure_template_runs_the_bus_and_refuses_forgeries() {
    let dir = TempDir::new("secure");
    pki(&dir, "one", &["server"]);
    password_file(
        &dir,
        &[
            ("edgebus", "bus-secret"),
            ("kv", "kv-secret"),
            ("alice", "alice-pw"),
            ("bob", "bob-pw"),
        ],
    );
    dir.file("bus.password", "bus-secret\n");
    let cfg = secure_template(&dir);
    // The shipped `order` saga too, so that the orchestrator works under its permission.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.toml"),
    )
    .expect("topics.toml");
    let sagas = &shipped[shipped.find("[[saga]]").expect("the order saga")..];
    let journal = dir.0.join("sagas.journal");
    let mut text = std::fs::read_to_string(&cfg).expect("template");
    text.push_str(&format!(
        "\n[orchestrator]\njournal = \"{}\"\n\n{sagas}",
        journal.display()
    ));
    std::fs::write(&cfg, text).expect("write");
    let c = cfg.to_str().expect("utf-8");
    let check = run_edgebus(&["check-config", "-c", c], None, T);
    assert!(check.ok, "{}{}", check.stdout, check.stderr);

    let mut cmd = edgebus();
    cmd.args(["up", "-c", c]);
    let up = Proc::spawn(cmd);
    let plain = broker_addr(&up);
    let tls = listening(&up, "edgebus TLS listening on ").port();
    up.expect_line("all parts ready", Duration::from_secs(15));
    let url = format!("mqtts://localhost:{tls}");
    let ca = dir.0.join("one-ca.pem").display().to_string();
    let login = |cmd: &mut std::process::Command, user: &str, pw: &str| {
        cmd.env("EDGEBUS_USERNAME", user)
            .env("EDGEBUS_PASSWORD", pw)
            .env("EDGEBUS_CA_FILE", &ca);
    };

    // A service on its own login, over TLS.
    let mut kv = edgebus();
    kv.args(["service", "kv", "--broker", &url]);
    login(&mut kv, "kv", "kv-secret");
    let _kv = Proc::spawn(kv).expect_ready();

    // A caller, over TLS: echo (run by `edgebus up`), kv's `get`, and the views.
    let call = |user: &str, pw: &str, target: &str, body: &str| {
        let mut cmd = edgebus();
        login(&mut cmd, user, pw);
        run_command(
            cmd,
            &["call", target, body, "--broker", &url, "--timeout", "3s"],
            None,
            T,
        )
    };
    let out = call("alice", "alice-pw", "echo/echo", r#"{"n":1}"#);
    assert!(
        out.ok && out.stdout.contains(r#""n":1"#),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let out = call("alice", "alice-pw", "kv/get", r#"{"key":"k"}"#);
    assert!(
        out.stdout.contains(r#""service":"kv""#),
        "{}{}",
        out.stdout,
        out.stderr
    );
    // The saga: the orchestrator calls kv (on its own login) and answers alice.
    let order = r#"{"order":"o1","qty":2,"amount":10,"address":"x"}"#;
    let out = call("alice", "alice-pw", "saga/order", order);
    assert!(
        out.ok && out.stdout.contains(r#""status":"completed""#),
        "{}{}",
        out.stdout,
        out.stderr
    );
    for view in ["services", "health"] {
        let mut cmd = edgebus();
        login(&mut cmd, "alice", "alice-pw");
        let out = run_command(cmd, &[view, "--broker", &url], None, T);
        assert!(out.ok, "{view}: {}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("kv"), "{view}: {}", out.stdout);
    }
    // So far nothing was refused: the template grants every part what it does.
    if let Some(line) = up.find_line("refused", Duration::from_millis(500)) {
        panic!("the bus's own work was refused something: {line}");
    }

    // What each may not do: refused, and logged with the user and the topic.
    let port = plain.port().to_string();
    let forge = |user: &str, pw: &str, topic: &str| {
        let (_, out) = publish(
            &port,
            &[
                "-V",
                "mqttv5",
                "-u",
                user,
                "-P",
                pw,
                "-q",
                "1",
                "-i",
                &format!("{user}-1"),
                "-r",
                "-t",
                topic,
                "-m",
                r#"{"state":"online"}"#,
            ],
        );
        assert!(out.contains("Not authorized"), "{user} → {topic}: {out}");
        up.expect_line(
            &format!("topic={topic} user=\"{user}\" reason=\"denied by ACL\""),
            T,
        );
    };
    // A caller forging a registration, a heartbeat, a reply and a health record.
    forge("alice", "alice-pw", "edge/system/discovery/echo/alice-1");
    forge("alice", "alice-pw", "edge/health/heartbeat/echo/alice-1");
    forge("alice", "alice-pw", "edge/system/reply/bob-1");
    forge("alice", "alice-pw", "edge/health/status/echo");
    // A service forging another service's registration, or its own under another instance.
    forge("kv", "kv-secret", "edge/system/discovery/echo/kv-1");
    forge("kv", "kv-secret", "edge/system/discovery/kv/kv-2");
    forge("kv", "kv-secret", "edge/health/summary");
    // A caller without a permission learns it at once: FORBIDDEN, from the broker.
    let t0 = std::time::Instant::now();
    let out = call("alice", "alice-pw", "kv/put", r#"{"key":"k","value":1}"#);
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stdout.contains("FORBIDDEN"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    up.expect_line(
        "topic=edge/kv/put/request user=\"alice\" reason=\"denied by ACL\"",
        T,
    );
    // The same by hand, and anything for bob.
    forge("alice", "alice-pw", "edge/kv/put/request");
    forge("bob", "bob-pw", "edge/echo/echo/request");
    // Reading another caller's replies.
    let (_, out) = run_tool(
        "mosquitto_sub",
        &port,
        &[
            "-V",
            "mqttv5",
            "-u",
            "alice",
            "-P",
            "alice-pw",
            "-t",
            "edge/system/reply/bob-1",
            "-W",
            "1",
        ],
    );
    assert!(out.contains("subscription requests were denied"), "{out}");
    // Anonymous, and a wrong password: refused at CONNECT.
    let (ok, _) = publish(&port, &["-t", "edge/system/discovery/echo/x", "-m", "{}"]);
    assert!(!ok, "anonymous accepted");
    up.expect_line("anonymous clients are not allowed", T);
    let (ok, _) = publish(
        &port,
        &[
            "-u",
            "kv",
            "-P",
            "guess",
            "-t",
            "edge/kv/x/result",
            "-m",
            "{}",
        ],
    );
    assert!(!ok, "a wrong password accepted");
    up.expect_line("wrong username or password", T);

    // `systemctl reload edgebus-up`: the certificate read again, nothing dropped.
    up.signal("HUP");
    up.expect_line("TLS certificate and key read again", T);
    // Still serving, the registry unharmed.
    let out = call("alice", "alice-pw", "echo/echo", r#"{"n":2}"#);
    assert!(
        out.ok && out.stdout.contains(r#""n":2"#),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

/// With `certificate_username`, a client certificate is the login: its common name is the
/// username the ACL and the log see, and no password is asked for.
#[test]
fn a_client_certificate_is_the_login() {
    let dir = TempDir::new("certlogin");
    pki(&dir, "one", &["server", "alice"]);
    let d = dir.0.display();
    let broker = |which: &str| {
        let cfg = dir.file(
            &format!("{which}.toml"),
            &format!(
                "[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n\
                 [broker.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{d}/one-server.pem\"\n\
                 key = \"{d}/one-server.key\"\nclient_ca = \"{d}/one-ca.pem\"\n\
                 certificate_username = \"{which}\"\n\
                 [broker.auth]\nanonymous = \"deny\"\n\
                 [broker.acl]\ndefault = \"deny\"\n\
                 [broker.acl.permissions]\nalice = [\"edge/alice/#:readwrite\"]\n"
            ),
        );
        let mut cmd = edgebus();
        cmd.args(["broker", "-c", cfg.to_str().expect("utf-8")]);
        let p = Proc::spawn(cmd);
        broker_addr(&p);
        let port = listening(&p, "edgebus TLS listening on ")
            .port()
            .to_string();
        (p, port)
    };
    let cert = |n: &str| dir.0.join(n).display().to_string();
    let as_alice = |port: &str, topic: &str| {
        tls_tool(
            &dir,
            "mosquitto_pub",
            port,
            "one-ca.pem",
            &[
                "--cert",
                &cert("one-alice.pem"),
                "--key",
                &cert("one-alice.key"),
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                "x",
            ],
        )
    };
    let (b, port) = broker("cn");
    let (ok, out) = as_alice(&port, "edge/alice/t");
    assert!(ok && !out.contains("Not authorized"), "{out}");
    let (_, out) = as_alice(&port, "edge/bob/t");
    assert!(out.contains("Not authorized"), "{out}");
    b.expect_line(
        "topic=edge/bob/t user=\"alice\" reason=\"denied by ACL\"",
        T,
    );
    drop(b);
    // The certificate has no DNS name: with `san` it names nobody, and is closed.
    let (b, port) = broker("san");
    let (ok, _) = as_alice(&port, "edge/alice/t");
    assert!(!ok, "a certificate without the name logged in");
    b.expect_line("the client certificate has no such name", T);
}

/// MQTT over WebSocket over TLS (`wss://`), with the TLS listener's certificate and its
/// client-certificate login: only `alice` may write, and the message arrives.
#[test]
fn websocket_over_tls() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let dir = TempDir::new("wss");
    pki(&dir, "one", &["server", "alice"]);
    let d = dir.0.display();
    let cfg = dir.file(
        "wss.toml",
        &format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n\
             [broker.tls]\nlisten = \"127.0.0.1:0\"\nwebsocket = \"127.0.0.1:0\"\n\
             cert = \"{d}/one-server.pem\"\nkey = \"{d}/one-server.key\"\n\
             client_ca = \"{d}/one-ca.pem\"\ncertificate_username = \"cn\"\n\
             [broker.acl]\ndefault = \"deny\"\n\
             [[broker.acl.rule]]\ntopic = \"wss/#\"\naccess = \"read\"\n\
             [broker.acl.permissions]\nalice = [\"wss/#:write\"]\n"
        ),
    );
    let mut cmd = edgebus();
    cmd.args(["broker", "-c", cfg.to_str().expect("utf-8")]);
    let b = Proc::spawn(cmd);
    let plain = broker_addr(&b);
    let wss = listening(&b, "edgebus TLS websocket listening on ");
    let sub = Sub::start(&plain.port().to_string(), &["-t", "wss/#"]);
    let file = |n: &str| Some(dir.0.join(n));
    let config = edgebus_runtime::bus::client_config(&edgebus_runtime::bus::TlsOptions {
        ca_file: file("one-ca.pem"),
        cert: file("one-alice.pem"),
        key: file("one-alice.key"),
    })
    .expect("client config");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(wss).await.expect("connect");
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect("localhost".try_into().expect("name"), tcp)
            .await
            .expect("TLS handshake");
        let mut req = format!("wss://localhost:{}/mqtt", wss.port())
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("sec-websocket-protocol", "mqtt".parse().expect("header"));
        let (mut conn, _) = tokio::time::timeout(T, tokio_tungstenite::client_async(req, tls))
            .await
            .expect("websocket handshake in time")
            .expect("websocket handshake");
        conn.send(Message::Binary(connect_v311("wss-client", 30).into()))
            .await
            .expect("send");
        let msg = tokio::time::timeout(T, conn.next())
            .await
            .expect("CONNACK in time")
            .expect("frame")
            .expect("ok");
        assert_eq!(msg.into_data().as_ref(), &[0x20, 2, 0, 0], "accepted");
        // PUBLISH wss/1 "hi", QoS 0.
        let publish = [0x30, 8, 0, 5, b'w', b's', b's', b'/', b'1', b'h'];
        conn.send(Message::Binary(publish.to_vec().into()))
            .await
            .expect("publish");
    });
    assert_eq!(sub.next(T).as_deref(), Some("wss/1 h"));
}

/// A request the ACL refuses is answered by the broker at once on the caller's Response
/// Topic: `UNAUTHORIZED` for an anonymous client, with its correlation data and `status`.
#[test]
fn a_refused_request_is_answered_unauthorized() {
    let b = Broker::start_with(
        "[broker.acl]\ndefault = \"deny\"\n\
         [[broker.acl.rule]]\ntopic = \"edge/system/reply/+\"\naccess = \"read\"\n",
    );
    let (ok, out) = run_tool(
        "mosquitto_rr",
        &b.port(),
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "edge/system/reply/anon",
            "-m",
            "{}",
            "-W",
            "3",
            "-F",
            "%P %p",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("status:UNAUTHORIZED"), "{out}");
    assert!(out.contains(r#""code":"UNAUTHORIZED""#), "{out}");
    // A Response Topic the client may not read gets nothing (its SUBSCRIBE is refused too).
    let (_, out) = run_tool(
        "mosquitto_rr",
        &b.port(),
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "elsewhere",
            "-m",
            "{}",
            "-W",
            "1",
        ],
    );
    assert!(!out.contains("UNAUTHORIZED"), "{out}");
}
