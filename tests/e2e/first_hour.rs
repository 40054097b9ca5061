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
