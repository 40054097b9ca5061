//! Tokens as MQTT passwords: who they name, what their permissions let through, and what
//! is refused (expired, another key, another algorithm, `none`, the wrong username), and the
//! connection closed when the token expires.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::security::openssl;

const T: Duration = Duration::from_secs(10);

/// A topics.toml for `edgebus broker` on a free port with `jwt` as `[broker.auth.jwt]`,
/// anonymous clients refused and an ACL that denies what nothing grants.
fn config(dir: &TempDir, name: &str, jwt: &str) -> PathBuf {
    dir.file(
        name,
        &format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n\
             [broker.auth]\nanonymous = \"deny\"\n\
             [broker.auth.jwt]\n{jwt}\n\
             [broker.acl]\ndefault = \"deny\"\n"
        ),
    )
}

/// An HS256 configuration with a fresh 32-byte secret in `{name}.secret`.
fn hs256(dir: &TempDir, name: &str) -> PathBuf {
    let secret = dir.file(
        &format!("{name}.secret"),
        &format!("{name}-0123456789abcdef0123456789abcdef\n"),
    );
    config(
        dir,
        &format!("{name}.toml"),
        &format!(
            "algorithm = \"HS256\"\nsecret_file = \"{}\"",
            secret.display()
        ),
    )
}

/// `edgebus token SUBJECT -p …` with `cfg`'s key.
fn mint(cfg: &Path, subject: &str, permissions: &[&str], ttl: &str) -> String {
    let mut args = vec![
        "token",
        subject,
        "-c",
        cfg.to_str().expect("utf-8"),
        "--ttl",
        ttl,
    ];
    for p in permissions {
        args.extend(["-p", p]);
    }
    let out = run_edgebus(&args, None, T);
    assert!(out.ok, "edgebus token: {}{}", out.stdout, out.stderr);
    out.stdout.trim().to_owned()
}

fn pub_as(port: &str, user: &str, token: &str, topic: &str) -> (bool, String) {
    publish(
        port,
        &[
            "-V", "mqttv5", "-u", user, "-P", token, "-q", "1", "-t", topic, "-m", "x",
        ],
    )
}

#[test]
fn tokens_name_the_client_and_grant_what_they_say() {
    let dir = TempDir::new("tokens");
    let cfg = hs256(&dir, "main");
    let b = Broker::start_config(&cfg, false);
    let port = b.port();
    let reader = mint(&cfg, "reader", &["edge/sensors/#:read"], "1h");
    let writer = mint(&cfg, "writer", &["edge/sensors/#:write"], "1h");

    // Allowed: the writer's publish reaches the reader.
    let sub = Sub::start(
        &port,
        &["-u", "reader", "-P", &reader, "-t", "edge/sensors/#"],
    );
    let (ok, out) = pub_as(&port, "writer", &writer, "edge/sensors/t1");
    assert!(ok, "{out}");
    assert_eq!(sub.next(T).as_deref(), Some("edge/sensors/t1 x"));

    // Denied: outside the writer's permission, and the reader may not write at all.
    let (_, out) = pub_as(&port, "writer", &writer, "edge/actuators/valve");
    assert!(out.to_lowercase().contains("not authorized"), "{out}");
    b.proc.expect_line("reason=\"denied by ACL\"", T);
    let (_, out) = pub_as(&port, "reader", &reader, "edge/sensors/t1");
    assert!(out.to_lowercase().contains("not authorized"), "{out}");
    assert_eq!(sub.drain(Duration::from_millis(300)), Vec::<String>::new());

    // Refused at CONNECT, each with its reason in the log.
    let refused = |user: &str, password: &str, reason: &str| {
        let (ok, out) = pub_as(&port, user, password, "edge/sensors/t1");
        assert!(!ok, "{reason}: accepted ({out})");
        b.proc.expect_line(reason, T);
    };
    // Someone else's token under another name.
    refused(
        "mallory",
        &writer,
        "the username is not the token's subject",
    );
    // Signed with another key.
    let other = mint(&hs256(&dir, "other"), "writer", &["#:write"], "1h");
    refused("writer", &other, "bad signature");
    // `alg: none`: the writer's claims, widened, unsigned.
    let claims = writer.split('.').nth(1).expect("claims");
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    refused("writer", &none, "not a valid token");
    // Not a token, and there is no password file.
    refused("writer", "hunter2", "the password is not a token");
    // Expired: minted for one second, tried until the broker says so.
    let brief = mint(&cfg, "writer", &["edge/sensors/#:write"], "1s");
    let deadline = Instant::now() + T;
    loop {
        let (_, out) = pub_as(&port, "writer", &brief, "edge/sensors/t2");
        if out.to_lowercase().contains("bad user name or password") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a one-second token still accepted"
        );
    }
    b.proc.expect_line("the token has expired", T);
    // Nothing refused got through: only the brief token's publishes while it was valid.
    let got = sub.drain(Duration::from_millis(300));
    assert!(got.iter().all(|m| m == "edge/sensors/t2 x"), "{got:?}");
}

#[test]
fn a_connection_ends_when_its_token_expires() {
    let dir = TempDir::new("expiry");
    let cfg = hs256(&dir, "main");
    let b = Broker::start_config(&cfg, false);
    let connect = |token: &str, v5: bool| {
        let mut s = raw(b.addr);
        send(
            &mut s,
            &packet::Connect {
                v5,
                client_id: if v5 { "brief-5" } else { "brief-4" },
                keep_alive: 60,
                username: Some("brief"),
                password: Some(token),
                ..Default::default()
            }
            .bytes(),
        );
        let (kind, body) = packet::read(&mut s).expect("CONNACK");
        assert_eq!(kind >> 4, 2, "CONNACK");
        assert_eq!(body[1], 0, "accepted");
        s
    };
    let token = mint(&cfg, "brief", &[], "2s");
    let t0 = Instant::now();
    let mut v5 = connect(&token, true);
    let mut v311 = connect(&token, false);
    // MQTT 5: DISCONNECT with 0xA0, "Maximum connect time" [MQTT 5 §3.14.2.1].
    let (kind, body) = packet::read_kind(&mut v5, 14).expect("DISCONNECT at expiry");
    assert_eq!(kind, 0xE0);
    assert_eq!(body.first(), Some(&0xA0), "reason code: {body:?}");
    let waited = t0.elapsed();
    assert!(
        // `exp` is in whole seconds: a 2 s token minted just before has 1–2 s left.
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(4),
        "closed after {waited:?} for a two-second token"
    );
    // MQTT 3.1.1 has no DISCONNECT from the server: the connection is closed.
    assert!(closed_by_peer(&mut v311), "3.1.1 connection closed");
    let mut rest = Vec::new();
    let _ = v5.read_to_end(&mut rest);
    b.proc.expect_line("token expired; closing", T);
}

#[test]
fn public_key_tokens_and_the_algorithm_pinned() {
    let dir = TempDir::new("pubkey");
    for (alg, genpkey) in [
        ("EdDSA", &["-algorithm", "ed25519"][..]),
        (
            "RS256",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
        ),
    ] {
        let key = format!("{alg}.key");
        let public = format!("{alg}.pub");
        let mut args = vec!["genpkey"];
        args.extend_from_slice(genpkey);
        args.extend(["-out", &key]);
        openssl(&dir.0, &args);
        openssl(&dir.0, &["pkey", "-in", &key, "-pubout", "-out", &public]);
        let d = dir.0.display();
        let cfg = config(
            &dir,
            &format!("{alg}.toml"),
            &format!(
                "algorithm = \"{alg}\"\npublic_key = \"{d}/{public}\"\n\
                 private_key = \"{d}/{key}\""
            ),
        );
        let b = Broker::start_config(&cfg, false);
        let port = b.port();
        let token = mint(&cfg, "device", &["edge/d/#:write"], "1h");
        let (ok, out) = pub_as(&port, "device", &token, "edge/d/1");
        assert!(ok, "{alg}: {out}");
        // The public key used as an HS256 secret (the classic confusion): refused, because
        // the broker takes only the algorithm it is configured for.
        let confused = config(
            &dir,
            &format!("{alg}-confused.toml"),
            &format!("algorithm = \"HS256\"\nsecret_file = \"{d}/{public}\""),
        );
        let forged = mint(&confused, "device", &["#:write"], "1h");
        let (ok, _) = pub_as(&port, "device", &forged, "edge/d/1");
        assert!(
            !ok,
            "{alg}: an HS256 token signed with the public key was accepted"
        );
        b.proc
            .expect_line("signed with another algorithm than the configured one", T);
    }
}

#[test]
fn a_service_and_its_callers_log_in_with_tokens() {
    let dir = TempDir::new("svc-tokens");
    let cfg = hs256(&dir, "main");
    let b = Broker::start_config(&cfg, false);
    let port = b.port();
    let echo = mint(&cfg, "echo", &["echo:serve"], "1h");
    let alice = mint(&cfg, "alice", &["echo:call"], "1h");
    let bob = mint(&cfg, "bob", &["kv:call"], "1h");

    // The service logs in with its token from the environment; `serve` is all it needs.
    let mut cmd = edgebus();
    cmd.args(["service", "echo", "--broker", &b.addr.to_string()])
        .env("EDGEBUS_USERNAME", "echo")
        .env("EDGEBUS_PASSWORD", &echo);
    let _svc = Proc::spawn(cmd).expect_ready();

    // A caller with `echo:call`, with mosquitto_rr on its own reply topic.
    let (ok, out) = rr(
        &port,
        &[
            "-u",
            "alice",
            "-P",
            &alice,
            "-i",
            "alice-1",
            "-e",
            "edge/system/reply/alice-1",
            "-t",
            "edge/echo/echo/request",
            "-m",
            r#"{"n":1}"#,
            "-W",
            "5",
        ],
    );
    assert!(ok && out.contains(r#""n":1"#), "{out}");
    // The service, registered, heartbeating and answering, was refused nothing.
    assert!(
        b.proc
            .find_line("refused", Duration::from_millis(500))
            .is_none(),
        "something of the echo service's was refused"
    );
    // And with `edgebus call`, the token in the environment.
    let mut call = edgebus();
    call.env("EDGEBUS_USERNAME", "alice")
        .env("EDGEBUS_PASSWORD", &alice);
    let out = run_command(
        call,
        &[
            "call",
            "echo/echo",
            r#"{"n":2}"#,
            "--broker",
            &b.addr.to_string(),
        ],
        None,
        T,
    );
    assert!(
        out.ok && out.stdout.contains(r#""n":2"#),
        "{}{}",
        out.stdout,
        out.stderr
    );

    // Without `echo:call`: the request is refused (and answered), and reading alice's
    // replies too.
    let (ok, out) = rr(
        &port,
        &[
            "-u",
            "bob",
            "-P",
            &bob,
            "-i",
            "bob-1",
            "-e",
            "edge/system/reply/bob-1",
            "-t",
            "edge/echo/echo/request",
            "-m",
            "{}",
            "-W",
            "2",
        ],
    );
    assert!(
        ok && out.contains(r#""code":"FORBIDDEN""#),
        "bob's request is answered FORBIDDEN by the broker at once: {out}"
    );
    b.proc
        .expect_line("user=\"bob\" reason=\"denied by ACL\"", T);
    let (_, out) = run_tool(
        "mosquitto_sub",
        &port,
        &[
            "-u",
            "bob",
            "-P",
            &bob,
            "-t",
            "edge/system/reply/alice-1",
            "-W",
            "1",
            "-V",
            "mqttv5",
        ],
    );
    assert!(out.contains("subscription requests were denied"), "{out}");
}
