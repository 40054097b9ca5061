//! The broker's own link to the router, used to publish Last Wills and the stats record.

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::Notification;
use tokio::sync::mpsc;
use tracing::warn;

/// A message the broker publishes itself.
#[derive(Debug)]
pub(crate) enum SysMsg {
    Publish {
        topic: Bytes,
        payload: Bytes,
        retain: bool,
        props: Option<PublishProperties>,
    },
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
    tokio::spawn(async move {
        while let Some(SysMsg::Publish {
            topic,
            payload,
            retain,
            props,
        }) = sys_rx.recv().await
        {
            let packet = Packet::Publish(Publish::new(topic, payload, retain), props);
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
