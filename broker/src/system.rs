//! The broker's own link to the router, used to publish Last Wills and the stats record.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, PingReq, Publish, PublishProperties};
use rumqttd::Notification;
use tokio::sync::mpsc;
use tracing::warn;

/// A message the broker publishes itself.
#[derive(Debug)]
// Publishes are the common message; boxing them to shrink the rare ping is not worth it.
#[allow(clippy::large_enum_variant)]
pub(crate) enum SysMsg {
    Publish {
        topic: Bytes,
        payload: Bytes,
        retain: bool,
        props: Option<PublishProperties>,
    },
    /// A PINGREQ through the router; the sender is answered when its PINGRESP comes back.
    Ping(tokio::sync::oneshot::Sender<()>),
}

/// Sends to the system link. Unbounded on purpose: each connection sends at most one will,
/// and losing a will is worse than a short queue.
#[derive(Clone, Debug)]
pub(crate) struct SysTx(mpsc::UnboundedSender<SysMsg>);

impl SysTx {
    pub fn send(&self, msg: SysMsg) {
        if self.0.send(msg).is_err() {
            warn!("system link is gone; message not published");
        }
    }
}

/// Starts the tasks that own the system link.
pub(crate) fn spawn(mut tx: LinkTx, mut rx: LinkRx) -> SysTx {
    let (sys_tx, mut sys_rx) = mpsc::unbounded_channel::<SysMsg>();
    let waiters: Arc<Mutex<Vec<tokio::sync::oneshot::Sender<()>>>> = Arc::default();
    let pinged = waiters.clone();
    tokio::spawn(async move {
        while let Some(msg) = sys_rx.recv().await {
            let packet = match msg {
                SysMsg::Publish {
                    topic,
                    payload,
                    retain,
                    props,
                } => Packet::Publish(Publish::new(topic, payload, retain), props),
                SysMsg::Ping(done) => {
                    pinged.lock().unwrap_or_else(|e| e.into_inner()).push(done);
                    Packet::PingReq(PingReq)
                }
            };
            if let Err(e) = tx.send(packet).await {
                warn!(error = %e, "system link closed");
                break;
            }
        }
    });
    // The link subscribes to nothing, but the router may still pause it; keep it drained.
    tokio::spawn(async move {
        loop {
            match rx.next().await {
                // The link publishes at QoS 0, so its only acks are PINGRESPs.
                Ok(Some(Notification::DeviceAck(_))) => {
                    for w in waiters.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                        let _ = w.send(());
                    }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    SysTx(sys_tx)
}
