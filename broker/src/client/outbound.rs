//! What a connected client's session has for it: taken from the session's queue, encoded
//! (with the properties its version carries, subscription identifiers and topic aliases), and
//! written to its socket within `write_timeout`.

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{self, Packet, PubRel, PubRelReason, PublishProperties, QoS};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use super::Conn;
use crate::peer::{End, Version};
use crate::router::session::Out;
use crate::stats::{add, bump};

impl Conn {
    /// Takes what the session can send now and encodes it.
    pub fn fill(&mut self) -> Result<(), End> {
        // Let the socket take what is buffered before encoding more.
        if self.out.len() > 256 * 1024 {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let mut outs = Vec::new();
        let expired = self.session.take(now, &mut outs);
        add(&self.shared.stats.expired, expired as usize);
        for o in outs {
            self.send(o, now)?;
        }
        Ok(())
    }

    pub(super) fn send(&mut self, o: Out, now: std::time::Instant) -> Result<(), End> {
        let (pkid, dup, q) = match o {
            Out::PubRel(pkid) => {
                return self.encode(Packet::PubRel(
                    PubRel {
                        pkid,
                        reason: PubRelReason::Success,
                    },
                    None,
                ))
            }
            Out::Publish { pkid, dup, q } => (pkid, dup, q),
        };
        let m = &q.msg;
        let mut props = if self.version == Version::V5 {
            m.props_at(now)
        } else {
            if m.props.is_some() {
                bump(&self.shared.stats.properties_stripped);
            }
            None
        };
        if self.version == Version::V5 && !q.sub_ids.is_empty() {
            props
                .get_or_insert_with(empty_props)
                .subscription_identifiers = q.sub_ids.iter().map(|&i| i as usize).collect();
        }
        // Topic aliases, by topic: the first PUBLISH of a topic sets one, later ones send
        // the alias with an empty topic.
        let mut topic = m.topic.clone();
        let mut new_alias = None;
        if self.alias_max > 0 {
            match self.aliases_out.get(&m.topic) {
                Some(&a) => {
                    props.get_or_insert_with(empty_props).topic_alias = Some(a);
                    topic = Bytes::new();
                }
                None if self.aliases_out.len() < usize::from(self.alias_max) => {
                    let a = self.aliases_out.len() as u16 + 1;
                    self.aliases_out.insert(m.topic.clone(), a);
                    props.get_or_insert_with(empty_props).topic_alias = Some(a);
                    new_alias = Some(a);
                }
                None => {}
            }
        }
        let qos = match q.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let publish = protocol::Publish::with(qos, pkid, dup, q.retain, topic, m.payload.clone());
        let start = self.out.len();
        self.encode(Packet::Publish(publish, props))?;
        if self.out.len() - start > self.max_packet {
            // Never sent: larger than the client accepts [MQTT-3.1.2-25]; as if acknowledged.
            self.out.truncate(start);
            if new_alias.is_some() {
                self.aliases_out.remove(&m.topic);
            }
            if pkid != 0 {
                self.session.acked(pkid);
            }
            bump(&self.shared.stats.too_large);
            return Ok(());
        }
        bump(&self.shared.stats.messages_out);
        Ok(())
    }

    /// Writes what is buffered, bounded by `write_timeout`, giving way to a takeover.
    pub async fn write_out<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        claim: &crate::sessions::Claim,
    ) -> Result<(), End> {
        while !self.out.is_empty() {
            let n = self.out.len();
            let write = async {
                stream.write_all(&self.out).await?;
                stream.flush().await
            };
            tokio::select! {
                r = timeout(self.shared.config.write_timeout, write) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(End::Closed(e.to_string())),
                    Err(_) => return Err(End::Stalled(format!(
                        "client read nothing for {:?} (write_timeout)", self.shared.config.write_timeout
                    ))),
                },
                _ = claim.kick.cancelled() => return Err(End::TakenOver),
                _ = self.session.evicted_wake.notified() => {
                    return Err(End::Stalled(format!(
                        "took nothing for {:?} while its queue was full (slow_subscriber_timeout)",
                        self.shared.config.slow_subscriber_timeout
                    )));
                }
            }
            add(&self.shared.stats.bytes_out, n);
            self.out.clear();
            if self.out.capacity() > 64 * 1024 {
                self.out = BytesMut::new();
            }
            // More may have been queued for the client meanwhile.
            self.fill()?;
        }
        Ok(())
    }
}

/// PUBLISH properties with nothing set.
pub(super) fn empty_props() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: Vec::new(),
        content_type: None,
    }
}
