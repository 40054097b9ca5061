//! Accept loops. Each accepted socket gets TCP_NODELAY and its own task at once, so a slow
//! handshake or an idle socket never holds up the next client.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::Shared;

/// What a listener speaks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// MQTT over TCP.
    Tcp,
    /// MQTT over WebSocket.
    WebSocket,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket over TLS.
    TlsWebSocket,
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Without this, Nagle + delayed ACK add ~40 ms to every QoS 1 round trip.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        let shared = shared.clone();
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        match kind {
            Kind::Tcp => {
                tracker.spawn(crate::connection::serve(stream, local, peer, shared, None));
            }
            Kind::WebSocket => {
                tracker.spawn(crate::ws::serve(stream, local, peer, shared, None));
            }
            Kind::Tls => {
                tracker.spawn(crate::tls::serve(stream, local, peer, shared, false));
            }
            Kind::TlsWebSocket => {
                tracker.spawn(crate::tls::serve(stream, local, peer, shared, true));
            }
        }
    }
}
