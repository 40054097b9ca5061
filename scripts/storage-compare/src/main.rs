//! Write amplification of redb under the broker's load: 100 retained updates a second
//! (64-byte values, one key), one durable commit per 50 ms window, for 60 s.
use std::time::{Duration, Instant};

use redb::{Database, TableDefinition};

const T: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn main() {
    let path = std::env::args().nth(1).expect("db path");
    let window_ms: u64 = std::env::args().nth(2).map_or(50, |v| v.parse().unwrap());
    let db = Database::create(&path).unwrap();
    let w0 = write_bytes();
    let t0 = Instant::now();
    let per = (100 * window_ms / 1000).max(1);
    let windows = 60_000 / window_ms;
    let mut i = 0u64;
    for tick in 0..windows {
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            for _ in 0..per {
                let v = format!("{i:08}{}", "x".repeat(56));
                t.insert("sensor/t", v.as_bytes()).unwrap();
                i += 1;
            }
        }
        txn.commit().unwrap();
        let next = t0 + Duration::from_millis((tick + 1) * window_ms);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let written = write_bytes() - w0;
    let payload = i * 64;
    let size = std::fs::metadata(&path).unwrap().len();
    println!(
        "redb window={window_ms}ms updates={i} written={written} payload={payload} amplification={:.1} file={size}",
        written as f64 / payload as f64
    );
}
