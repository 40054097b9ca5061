//! Who gets a connection slot: no one address or identity can take them all.
//!
//! `max_connections` bounds the whole broker. Inside it:
//! - an authenticated user holds at most `max_connections_per_user` connections;
//! - anonymous clients from one IP address hold at most `max_connections_per_address`;
//! - the last `reserved_connections` slots are kept for authenticated clients and for the
//!   broker's own local user, so that neither anonymous crowd can lock them out.
//!
//! The bus's own parts connect over loopback, usually anonymously, from the same address as
//! any other local process. What tells them apart is the local user the connecting socket
//! belongs to: they run as the broker's user (one process with `edgebus up`, the `edgebus`
//! user under the shipped units). Only when an anonymous loopback client would be refused is
//! its socket looked up in the kernel's table (`/proc/self/net/tcp`, `tcp6`); if it belongs
//! to the broker's own user, it is let in up to `max_connections`. The lookup costs a read of
//! that table, and only happens on the refusal path, so a normal connect never pays it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use dashmap::DashMap;

use crate::stats::Stats;

/// Whose slot a connection takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Holder {
    /// An authenticated user.
    User(String),
    /// An anonymous client, by address.
    Address(IpAddr),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// `max_connections`.
    Broker,
    /// `max_connections_per_user`.
    User,
    /// `max_connections_per_address`.
    Address,
    /// Only the reserve is left, and this client may not use it.
    Reserved,
}

impl Full {
    /// The setting that refused the connection, for the log line.
    pub fn setting(self) -> &'static str {
        match self {
            Full::Broker => "max_connections",
            Full::User => "max_connections_per_user",
            Full::Address => "max_connections_per_address",
            Full::Reserved => "reserved_connections",
        }
    }
}

/// The limits, from `[broker]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub total: usize,
    pub per_user: usize,
    pub per_address: usize,
    pub reserved: usize,
}

/// Open connections, by holder.
#[derive(Default)]
pub(crate) struct Admission {
    held: DashMap<Holder, usize>,
}

/// A slot; given back when dropped.
pub(crate) struct Slot {
    admission: Arc<Admission>,
    holder: Holder,
    stats: Arc<Stats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.connections.fetch_sub(1, Relaxed);
        self.admission.held.remove_if_mut(&self.holder, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

impl Admission {
    /// Takes a slot for `holder`, or says which limit refuses it. `stats.connections`
    /// counts every connection of the broker; `local` and `peer` are the socket's two ends.
    pub fn admit(
        self: &Arc<Self>,
        limits: Limits,
        holder: Holder,
        stats: &Arc<Stats>,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<Slot, Full> {
        let before = stats.connections.fetch_add(1, Relaxed) as usize;
        let slot = Slot {
            admission: self.clone(),
            holder: holder.clone(),
            stats: stats.clone(),
        };
        // From here on, dropping `slot` gives everything back.
        let mut held = self.held.entry(holder.clone()).or_insert(0);
        *held += 1;
        let mine = *held;
        drop(held);
        if before >= limits.total {
            return Err(Full::Broker);
        }
        let in_reserve = before >= limits.total.saturating_sub(limits.reserved);
        match &holder {
            Holder::User(_) if mine > limits.per_user => Err(Full::User),
            Holder::User(_) => Ok(slot),
            Holder::Address(_) if mine <= limits.per_address && !in_reserve => Ok(slot),
            Holder::Address(ip) => {
                if ip.to_canonical().is_loopback() && is_own_user(local, peer) {
                    Ok(slot)
                } else if in_reserve {
                    Err(Full::Reserved)
                } else {
                    Err(Full::Address)
                }
            }
        }
    }
}

/// Whether the other end of the loopback connection `local` ← `peer` is a socket of this
/// process's own user.
fn is_own_user(local: SocketAddr, peer: SocketAddr) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(own) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return false;
    };
    let table = if peer.is_ipv4() { "tcp" } else { "tcp6" };
    let Ok(text) = std::fs::read_to_string(format!("/proc/self/net/{table}")) else {
        return false;
    };
    socket_owner(&text, peer, local) == Some(own)
}

/// The uid column of the row whose local end is `from` and remote end is `to`.
fn socket_owner(table: &str, from: SocketAddr, to: SocketAddr) -> Option<u32> {
    let (a, b) = (proc_addr(from), proc_addr(to));
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        let (_, l, r) = (cols.next()?, cols.next()?, cols.next()?);
        if l != a || r != b {
            return None;
        }
        cols.nth(4)?.parse().ok()
    })
}

/// An address as the kernel writes it in `/proc/net/tcp`: each 32-bit word of the address
/// as a native-endian number in hex, then the port.
fn proc_addr(a: SocketAddr) -> String {
    let words = |b: &[u8]| -> String {
        b.chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect()
    };
    let ip = match a.ip() {
        IpAddr::V4(v4) => words(&v4.octets()),
        IpAddr::V6(v6) => words(&v6.octets()),
    };
    format!("{ip}:{:04X}", a.port())
}

/// Logs refused connections at most once a second, with how many there were.
#[derive(Default)]
pub(crate) struct RefusalLog(std::sync::Mutex<crate::peer::Throttle>);

impl RefusalLog {
    /// Counts one refusal by `setting`, of a client from `ip`.
    pub fn note(&self, ip: IpAddr, setting: &'static str) {
        let due = self.0.lock().unwrap_or_else(|e| e.into_inner()).tick();
        if let Some(refused) = due {
            tracing::warn!(
                address = %ip,
                limit = setting,
                refused_since_last_line = refused,
                "connection limit reached; refusing"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        total: 10,
        per_user: 3,
        per_address: 4,
        reserved: 2,
    };

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn per_address_per_user_and_the_reserve() {
        let a = Arc::new(Admission::default());
        let open = Arc::new(Stats::default());
        let (local, far) = (addr("10.0.0.1:1883"), addr("10.0.0.2:5000"));
        let anon = |ip: &str| Holder::Address(ip.parse().expect("ip"));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(
                a.admit(LIMITS, anon("10.0.0.2"), &open, local, far)
                    .expect("slot"),
            );
        }
        assert_eq!(
            a.admit(LIMITS, anon("10.0.0.2"), &open, local, far).err(),
            Some(Full::Address)
        );
        for _ in 0..4 {
            held.push(
                a.admit(LIMITS, anon("10.0.0.3"), &open, local, far)
                    .expect("slot"),
            );
        }
        // 8 open: the last 2 are the reserve.
        assert_eq!(
            a.admit(LIMITS, anon("10.0.0.4"), &open, local, far).err(),
            Some(Full::Reserved)
        );
        let user = Holder::User("alice".into());
        held.push(
            a.admit(LIMITS, user.clone(), &open, local, far)
                .expect("reserve"),
        );
        held.push(
            a.admit(LIMITS, user.clone(), &open, local, far)
                .expect("reserve"),
        );
        assert_eq!(
            a.admit(LIMITS, user.clone(), &open, local, far).err(),
            Some(Full::Broker)
        );
        assert_eq!(open.connections.load(Relaxed), 10);
        held.clear();
        assert_eq!(open.connections.load(Relaxed), 0);
        assert!(a.held.is_empty(), "every slot given back");
    }

    #[test]
    fn proc_net_rows() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:075B 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000  1000        0 123 1 0 20 4 30 10 -1\n";
        let peer = addr("127.0.0.1:1883");
        let local = addr("127.0.0.1:41394");
        assert_eq!(proc_addr(peer), "0100007F:075B");
        assert_eq!(socket_owner(table, peer, local), Some(1000));
        assert_eq!(socket_owner(table, local, peer), None);
    }

    #[test]
    fn this_process_owns_its_own_loopback_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_server, peer) = listener.accept().expect("accept");
        let local = client.peer_addr().expect("peer");
        assert!(is_own_user(local, peer));
    }
}
