//! A connected client, from CONNACK to close: the packets it sends, routed in this task, and
//! the messages of its session, written to its socket.
//!
//! One loop owns the socket. It handles every whole frame already read, routes each PUBLISH
//! into the queues of its subscribers, takes what the session's queue holds for the client,
//! writes, and then waits for the socket, for its session's wake-up, for a takeover or for
//! shutdown. When a subscriber's queue is full, the PUBLISH being routed waits for room
//! before the next frame is handled, and the socket is not read meanwhile: a publisher goes
//! only as fast as the slowest connected subscriber of what it publishes, and nothing is lost
//! while that subscriber keeps reading. While it waits, this client's own queue is still
//! written out.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttd::protocol::{
    self, Disconnect, DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, PublishProperties, QoS, SubAck,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::warn;

use crate::acl::Principal;
use crate::connection::{clip, End, Throttle, Version};
use crate::frame::{self, kind, Check, Frame};
use crate::router::message::Message;
use crate::router::session::{Full, Out, Queued, Session};
use crate::router::tree::SubOptions;
use crate::router::Filter;
use crate::stats::{add, bump};
use crate::strict;
use crate::Shared;
use edgebus_proto::policy::TokenBucket;

/// What one connection holds.
pub(crate) struct Conn {
    pub version: Version,
    pub shared: Arc<Shared>,
    pub user: Option<String>,
    pub client_id: String,
    pub session: Arc<Session>,
    /// Bytes waiting to be written to the client.
    pub out: BytesMut,
    /// MQTT 5 topic aliases the client set, so the ACL sees the real topic.
    aliases_in: HashMap<u16, Bytes>,
    /// Topic aliases this broker set for the client, by topic (MQTT 5 §3.3.2.3.4).
    aliases_out: HashMap<Bytes, u16>,
    /// The client's Topic Alias Maximum.
    alias_max: u16,
    /// The client's Maximum Packet Size [MQTT-3.1.2-24].
    max_packet: usize,
    pub keep_alive: Duration,
    pub limits: Limits,
    /// Refused publishes not yet logged.
    denied_log: Throttle,
    /// Deliveries of the PUBLISH being routed that are still to be queued, and its
    /// acknowledgement, sent once they are.
    pending: VecDeque<(Arc<Session>, Queued)>,
    pending_ack: Option<Packet>,
    /// Session Expiry Interval the client asked for (MQTT 5; DISCONNECT may change it).
    pub expiry: u32,
}

/// A connection's publish rate limits, and the drops not yet logged.
pub(crate) struct Limits {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    log: Throttle,
}

impl Limits {
    fn new(config: &crate::config::ClientRateLimit) -> Limits {
        Limits {
            messages: config.messages.map(TokenBucket::new),
            bytes: config.bytes.map(TokenBucket::new),
            log: Throttle::default(),
        }
    }

    /// Whether a publish of `len` payload bytes fits; both buckets are charged only if so.
    pub fn admit(&mut self, len: usize) -> bool {
        let len = len as f64;
        let fits = self.messages.as_mut().map_or(true, |b| b.has(1.0))
            && self.bytes.as_mut().map_or(true, |b| b.has(len));
        if fits {
            for (bucket, n) in [(&mut self.messages, 1.0), (&mut self.bytes, len)] {
                if let Some(b) = bucket {
                    b.try_take(n);
                }
            }
        }
        fits
    }
}

/// What the CONNECT said that the loop needs.
pub(crate) struct Hello {
    pub keep_alive: u16,
    pub alias_max: u16,
    pub max_packet: Option<u32>,
    pub expiry: u32,
}

impl Conn {
    pub fn new(
        version: Version,
        shared: Arc<Shared>,
        user: Option<String>,
        client_id: String,
        session: Arc<Session>,
        hello: Hello,
    ) -> Conn {
        let limits = Limits::new(&shared.config.rate_limit);
        Conn {
            version,
            user,
            client_id,
            session,
            out: BytesMut::new(),
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            alias_max: if version == Version::V5 {
                hello.alias_max
            } else {
                0
            },
            max_packet: hello.max_packet.map_or(usize::MAX, |m| m as usize),
            keep_alive: Duration::from_secs(u64::from(hello.keep_alive)),
            limits,
            denied_log: Throttle::default(),
            pending: VecDeque::new(),
            pending_ack: None,
            expiry: hello.expiry,
            shared,
        }
    }

    fn principal(&self) -> Principal<'_> {
        Principal {
            user: self.user.as_deref(),
            client_id: &self.client_id,
        }
    }

    pub fn encode(&mut self, packet: Packet) -> Result<(), End> {
        let packet = if self.version == Version::V311 {
            crate::connection::strip_properties(packet)
        } else {
            packet
        };
        self.version
            .encode(packet, &mut self.out)
            .map_err(|e| End::Protocol(format!("cannot encode a packet for this client: {e}")))
    }

    pub fn disconnect_v5(&mut self, reason_code: DisconnectReasonCode) {
        let _ = self.encode(Packet::Disconnect(Disconnect { reason_code }, None));
    }

    /// Serves the connection until it ends. `resend` is what was in flight when the session
    /// was last left, sent first.
    pub async fn run<S>(
        &mut self,
        stream: &mut S,
        rbuf: &mut BytesMut,
        claim: &crate::sessions::Claim,
        resend: Vec<Out>,
    ) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let max = self.shared.config.max_payload.as_usize();
        let shutdown = self.shared.shutdown.clone();
        let grace = self.keep_alive + self.keep_alive / 2;
        let mut deadline = Instant::now() + grace;
        for o in resend {
            if let Err(end) = self.send(o, std::time::Instant::now()) {
                return end;
            }
        }
        loop {
            if !self.pending.is_empty() {
                if let Err(end) = self.route_pending(stream, claim).await {
                    self.abandon_pending();
                    return end;
                }
                // The socket was not read while the publish waited: the client's keep-alive
                // runs from now.
                deadline = Instant::now() + grace;
            }
            // Every whole frame already buffered, until a PUBLISH has to wait for room.
            while self.pending.is_empty() {
                match frame::check(rbuf, max) {
                    Check::Incomplete => break,
                    Check::Ready(f) => {
                        if let Err(end) = self.on_frame(f, rbuf) {
                            let _ = self.write_out(stream, claim).await;
                            return end;
                        }
                    }
                    Check::TooLarge(n) => {
                        if self.version == Version::V5 {
                            self.disconnect_v5(DisconnectReasonCode::PacketTooLarge);
                            let _ = self.write_out(stream, claim).await;
                        }
                        return End::Protocol(format!(
                            "packet of {n} bytes exceeds max_payload ({max} bytes)"
                        ));
                    }
                    Check::Malformed => {
                        return End::Protocol("malformed remaining length".into());
                    }
                }
            }
            if let Err(end) = self.fill() {
                return end;
            }
            if let Err(end) = self.write_out(stream, claim).await {
                return end;
            }
            if !self.pending.is_empty() {
                continue;
            }
            if self.session.take_evicted() {
                return self.evicted(stream).await;
            }
            // An idle connection keeps a small read buffer; a burst grows it, by doubling.
            if rbuf.is_empty() && rbuf.capacity() > 16 * 1024 {
                *rbuf = BytesMut::with_capacity(256);
            }
            if rbuf.capacity() - rbuf.len() < 128 {
                rbuf.reserve(256.max(rbuf.len()));
            }

            tokio::select! {
                _ = claim.kick.cancelled() => {
                    if self.version == Version::V5 {
                        self.disconnect_v5(DisconnectReasonCode::SessionTakenOver);
                        let _ = timeout(Duration::from_millis(100), stream.write_all(&self.out)).await;
                    }
                    return End::TakenOver;
                }
                _ = shutdown.cancelled() => {
                    if self.version == Version::V5 {
                        self.disconnect_v5(DisconnectReasonCode::ServerShuttingDown);
                        let _ = timeout(Duration::from_millis(100), stream.write_all(&self.out)).await;
                    }
                    return End::Shutdown;
                }
                r = tokio::io::AsyncReadExt::read_buf(stream, rbuf) => match r {
                    Ok(0) => return End::Closed("closed by peer".into()),
                    Ok(n) => {
                        add(&self.shared.stats.bytes_in, n);
                        deadline = Instant::now() + grace;
                    }
                    Err(e) => return End::Closed(e.to_string()),
                },
                _ = self.session.ready.notified() => {}
                _ = sleep_until(deadline), if !self.keep_alive.is_zero() => {
                    return End::KeepAlive;
                }
            }
        }
    }

    /// This client took nothing for `slow_subscriber_timeout` while a publisher waited.
    async fn evicted<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> End {
        if self.version == Version::V5 {
            // "Quota exceeded": it was sent more than it took.
            self.disconnect_v5(DisconnectReasonCode::QuotaExceeded);
            let _ = timeout(Duration::from_millis(100), stream.write_all(&self.out)).await;
        }
        End::Stalled(format!(
            "took nothing for {:?} while its queue was full (slow_subscriber_timeout)",
            self.shared.config.slow_subscriber_timeout
        ))
    }

    /// Queues the deliveries of the PUBLISH being routed, waiting for room in a connected
    /// subscriber's queue (the backpressure), then acknowledges the PUBLISH.
    async fn route_pending<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        claim: &crate::sessions::Claim,
    ) -> Result<(), End> {
        let patience = self.shared.config.slow_subscriber_timeout;
        while let Some((target, q)) = self.pending.pop_front() {
            let mut q = q;
            loop {
                let room = target.room.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                match target.push(q) {
                    Ok(()) => break,
                    Err(Full::Queue(back)) => q = back,
                }
                let now = std::time::Instant::now();
                let stalled = target.stalled_for(now);
                if !target.is_connected() {
                    self.shared.drop_for(&target, &q, "offline queue full");
                    break;
                }
                if Arc::ptr_eq(&target, &self.session) {
                    // Its own queue: only this client's acknowledgements, which sit unread
                    // behind this PUBLISH, could make room.
                    self.shared.drop_for(&target, &q, "its own queue is full");
                    break;
                }
                if stalled >= patience {
                    target.evict();
                    self.shared.drop_for(&target, &q, "subscriber stalled");
                    break;
                }
                let wait_until = Instant::now() + (patience - stalled);
                tokio::select! {
                    _ = &mut room => {}
                    _ = sleep_until(wait_until) => {}
                    _ = self.session.ready.notified() => {
                        // Our own client's messages keep flowing while we wait.
                        self.fill()?;
                        self.write_out(stream, claim).await?;
                    }
                    _ = claim.kick.cancelled() => return Err(End::TakenOver),
                    _ = self.shared.shutdown.cancelled() => return Err(End::Shutdown),
                }
            }
        }
        if let Some(ack) = self.pending_ack.take() {
            self.encode(ack)?;
        }
        Ok(())
    }

    /// The connection ends with a PUBLISH not yet routed to every subscriber: what is left
    /// is counted as dropped, and a QoS 2 packet id is forgotten so that the client's resend
    /// is routed again.
    fn abandon_pending(&mut self) {
        for (target, q) in std::mem::take(&mut self.pending) {
            self.shared
                .drop_for(&target, &q, "the publisher's connection ended");
        }
        if let Some(Packet::PubRec(rec, _)) = self.pending_ack.take() {
            self.session.release_qos2(rec.pkid);
        }
    }

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

    fn send(&mut self, o: Out, now: std::time::Instant) -> Result<(), End> {
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

    fn decode(&mut self, rbuf: &mut BytesMut, max: usize) -> Result<Packet, End> {
        self.version
            .decode(rbuf, max)
            .map_err(|e| End::Protocol(format!("malformed packet: {e}")))
    }

    fn on_frame(&mut self, f: Frame, rbuf: &mut BytesMut) -> Result<(), End> {
        let max = self.shared.config.max_payload.as_usize();
        strict::check(rbuf, f, self.version == Version::V5)
            .map_err(|why| End::Protocol(why.to_string()))?;
        match f.kind() {
            kind::PINGREQ => {
                rbuf.advance(f.len());
                self.encode(Packet::PingResp(PingResp))
            }
            kind::PUBLISH => match self.decode(rbuf, max)? {
                Packet::Publish(publish, props) => self.on_publish(publish, props),
                _ => Err(End::Protocol("PUBLISH did not decode as one".into())),
            },
            kind::SUBSCRIBE => match self.decode(rbuf, max)? {
                Packet::Subscribe(sub, props) => self.on_subscribe(sub, props),
                _ => Err(End::Protocol("SUBSCRIBE did not decode as one".into())),
            },
            kind::UNSUBSCRIBE => match self.decode(rbuf, max)? {
                Packet::Unsubscribe(unsub, _) => self.on_unsubscribe(unsub),
                _ => Err(End::Protocol("UNSUBSCRIBE did not decode as one".into())),
            },
            kind::PUBACK => {
                if let Packet::PubAck(ack, _) = self.decode(rbuf, max)? {
                    // An unknown packet id is ignored, as mosquitto does.
                    self.session.acked(ack.pkid);
                }
                Ok(())
            }
            kind::PUBCOMP => {
                if let Packet::PubComp(comp, _) = self.decode(rbuf, max)? {
                    self.session.acked(comp.pkid);
                }
                Ok(())
            }
            kind::PUBREC => match self.decode(rbuf, max)? {
                Packet::PubRec(rec, _)
                    if !matches!(
                        rec.reason,
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                    ) =>
                {
                    // A refusal ends the flow: no PUBREL (MQTT 5 §4.3.3).
                    self.session.acked(rec.pkid);
                    Ok(())
                }
                Packet::PubRec(rec, _) => {
                    let known = self.session.received(rec.pkid);
                    self.encode(Packet::PubRel(
                        PubRel {
                            pkid: rec.pkid,
                            reason: if known {
                                PubRelReason::Success
                            } else {
                                // MQTT 5 §3.6.2.1.
                                PubRelReason::PacketIdentifierNotFound
                            },
                        },
                        None,
                    ))
                }
                _ => Err(End::Protocol("PUBREC did not decode as one".into())),
            },
            kind::PUBREL => match self.decode(rbuf, max)? {
                Packet::PubRel(rel, _) => {
                    let known = self.session.release_qos2(rel.pkid);
                    // Always answered [MQTT-4.3.3-11]; unknown: 0x92, MQTT 5 §3.7.2.1.
                    self.encode(Packet::PubComp(
                        PubComp {
                            pkid: rel.pkid,
                            reason: if known {
                                PubCompReason::Success
                            } else {
                                PubCompReason::PacketIdentifierNotFound
                            },
                        },
                        None,
                    ))
                }
                _ => Err(End::Protocol("PUBREL did not decode as one".into())),
            },
            kind::DISCONNECT => {
                let (with_will, expiry) = match self.decode(rbuf, max) {
                    Ok(Packet::Disconnect(d, props)) => (
                        d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                        props.and_then(|p| p.session_expiry_interval),
                    ),
                    _ => (false, None),
                };
                if let Some(e) = expiry {
                    let cap = u32::try_from(self.shared.config.max_session_expiry.as_secs())
                        .unwrap_or(u32::MAX);
                    let e = e.min(cap);
                    if self.expiry == 0 && e != 0 {
                        return Err(End::Protocol(
                            "DISCONNECT sets a Session Expiry on a session that had none \
                             [MQTT-3.14.2-2]"
                                .into(),
                        ));
                    }
                    self.expiry = e;
                }
                Err(End::Disconnect { with_will })
            }
            kind::CONNECT => Err(End::Protocol("second CONNECT on one connection".into())),
            other => Err(End::Protocol(format!(
                "a client may not send {}",
                frame::kind_name(other)
            ))),
        }
    }

    fn on_publish(
        &mut self,
        publish: protocol::Publish,
        props: Option<PublishProperties>,
    ) -> Result<(), End> {
        let qos = publish.qos() as u8;
        let pkid = publish.pkid();
        let alias = props.as_ref().and_then(|p| p.topic_alias);
        let topic = if publish.topic.is_empty() {
            match alias.and_then(|a| self.aliases_in.get(&a)) {
                Some(t) => t.clone(),
                None => {
                    return Err(End::Protocol(
                        "PUBLISH with an empty topic and no known alias (MQTT 5 §3.3.2.3.4)".into(),
                    ))
                }
            }
        } else {
            if let Some(a) = alias {
                if self.aliases_in.len() < 4096 || self.aliases_in.contains_key(&a) {
                    self.aliases_in.insert(a, publish.topic.clone());
                }
            }
            publish.topic.clone()
        };
        let topic_str = strict::topic_name(&topic)
            .map_err(|why| End::Protocol(format!("invalid topic name: {why} [MQTT-3.3.2-1]")))?;
        if topic_str.starts_with('$') {
            let t = topic_str.to_owned();
            return self.deny_publish(qos, pkid, &t, "topics starting with `$` are reserved");
        }
        if !self
            .shared
            .config
            .acl
            .can_publish(self.principal(), topic_str)
        {
            let t = topic_str.to_owned();
            return self.deny_publish(qos, pkid, &t, "denied by ACL");
        }
        if !self.limits.admit(publish.payload.len()) {
            let t = topic_str.to_owned();
            return self.rate_limited(qos, pkid, &t);
        }
        let ack = match qos {
            1 => Some(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )),
            2 => Some(Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            )),
            _ => None,
        };
        // A QoS 2 PUBLISH sent again before its PUBREL was routed the first time.
        if qos == 2 && !self.session.incoming_qos2(pkid) {
            return match ack {
                Some(a) => self.encode(a),
                None => Ok(()),
            };
        }
        bump(&self.shared.stats.messages_in);
        let msg = Arc::new(Message::new(
            topic,
            publish.payload,
            qos,
            publish.retain,
            props,
            self.session.id(),
            std::time::Instant::now(),
        ));
        self.shared.route(&msg, &mut self.pending);
        self.pending_ack = ack;
        self.try_route()
    }

    /// Queues what fits of the PUBLISH being routed without waiting; acknowledges it once
    /// every delivery is queued. What does not fit is left for `route_pending`.
    fn try_route(&mut self) -> Result<(), End> {
        while let Some((target, q)) = self.pending.pop_front() {
            if let Err(Full::Queue(q)) = target.push(q) {
                self.pending.push_front((target, q));
                return Ok(());
            }
        }
        match self.pending_ack.take() {
            Some(ack) => self.encode(ack),
            None => Ok(()),
        }
    }

    /// Drops a publish over the connection's rate limit: counted, logged at most once a
    /// second per connection, and refused with "quota exceeded" to an MQTT 5 client.
    fn rate_limited(&mut self, qos: u8, pkid: u16, topic: &str) -> Result<(), End> {
        bump(&self.shared.stats.rate_limited);
        if let Some(dropped) = self.limits.log.tick() {
            warn!(
                topic = %clip(topic),
                dropped,
                "client over its publish rate limit; messages dropped"
            );
        }
        self.refuse_publish(
            qos,
            pkid,
            PubAckReason::QuotaExceeded,
            PubRecReason::QuotaExceeded,
        )
    }

    fn deny_publish(&mut self, qos: u8, pkid: u16, topic: &str, why: &str) -> Result<(), End> {
        bump(&self.shared.stats.denied_publish);
        if let Some(more) = self.denied_log.tick() {
            warn!(
                topic = %clip(topic),
                user = self.user.as_deref(),
                reason = why,
                refused_since_last_line = more,
                "publish refused"
            );
        }
        self.refuse_publish(
            qos,
            pkid,
            PubAckReason::NotAuthorized,
            PubRecReason::NotAuthorized,
        )
    }

    /// Acknowledges a publish that is not forwarded: with `ack`/`rec` to an MQTT 5 client,
    /// with success to a 3.1.1 one (it has no way to say no), so the client moves on. A
    /// 3.1.1 client's PUBREL then finds no packet id and gets its PUBCOMP all the same.
    fn refuse_publish(
        &mut self,
        qos: u8,
        pkid: u16,
        ack: PubAckReason,
        rec: PubRecReason,
    ) -> Result<(), End> {
        let v5 = self.version == Version::V5;
        match qos {
            1 => self.encode(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: if v5 { ack } else { PubAckReason::Success },
                },
                None,
            )),
            2 => self.encode(Packet::PubRec(
                PubRec {
                    pkid,
                    reason: if v5 { rec } else { PubRecReason::Success },
                },
                None,
            )),
            _ => Ok(()),
        }
    }

    fn on_subscribe(
        &mut self,
        sub: protocol::Subscribe,
        props: Option<protocol::SubscribeProperties>,
    ) -> Result<(), End> {
        let n = sub.filters.len();
        let id = props.and_then(|p| p.id).map(|i| i as u32);
        let mut codes = Vec::with_capacity(n);
        let mut refused = 0;
        // One log line per packet, however many filters it refuses.
        let mut first_refused: Option<(String, &'static str)> = None;
        let now = std::time::Instant::now();
        for f in &sub.filters {
            let Some(filter) = Filter::parse(&f.path) else {
                codes.push(self.refused_code(SubscribeReasonCode::TopicFilterInvalid));
                refused += 1;
                first_refused
                    .get_or_insert_with(|| (clip(&f.path).into_owned(), "bad shared subscription"));
                continue;
            };
            if let Err((code, why)) = self.admit_filter(filter) {
                bump(&self.shared.stats.denied_subscribe);
                codes.push(self.refused_code(code));
                refused += 1;
                first_refused.get_or_insert_with(|| (clip(&f.path).into_owned(), why));
                continue;
            }
            let granted = (f.qos as u8).min(2);
            let options = SubOptions {
                qos: granted,
                no_local: f.nolocal,
                retain_as_published: f.preserve_retain,
                id,
            };
            let existed = self.shared.router.subscribe(&self.session, filter, options);
            codes.push(SubscribeReasonCode::Success(f.qos));
            // Retained messages: not to shared subscriptions (MQTT 5 §4.8.2), and as Retain
            // Handling says: 0 always, 1 for a new subscription, 2 never [MQTT-3.3.1-9..11].
            let send_retained = filter.share.is_none()
                && match f.retain_forward_rule {
                    protocol::RetainForwardRule::OnEverySubscribe => true,
                    protocol::RetainForwardRule::OnNewSubscribe => !existed,
                    protocol::RetainForwardRule::Never => false,
                };
            if send_retained {
                for m in self.shared.router.retained_for(filter.filter, now) {
                    if !self
                        .shared
                        .config
                        .acl
                        .can_read(self.principal(), m.topic_str())
                    {
                        continue;
                    }
                    let q = Queued {
                        qos: m.qos.min(granted),
                        retain: true,
                        sub_ids: id.into_iter().collect(),
                        share: None,
                        msg: m,
                    };
                    if let Err(Full::Queue(q)) = self.session.push(q) {
                        self.shared
                            .drop_for(&self.session, &q, "queue full (retained messages)");
                    }
                }
            }
        }
        self.shared.stats.filters.store(
            self.shared.router.subscription_count() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some((filter, why)) = first_refused {
            warn!(
                refused,
                of = n,
                first = %filter,
                reason = why,
                user = self.user.as_deref(),
                "subscriptions refused"
            );
        }
        self.encode(Packet::SubAck(
            SubAck {
                pkid: sub.pkid,
                return_codes: codes,
            },
            None,
        ))
    }

    fn refused_code(&self, code: SubscribeReasonCode) -> SubscribeReasonCode {
        if self.version == Version::V5 {
            code
        } else {
            SubscribeReasonCode::Failure
        }
    }

    /// Checks one filter.
    fn admit_filter(&self, f: Filter<'_>) -> Result<(), (SubscribeReasonCode, &'static str)> {
        let invalid = SubscribeReasonCode::TopicFilterInvalid;
        if let Some(group) = f.share {
            if group.is_empty() || group.contains(['+', '#']) {
                return Err((invalid, "bad shared subscription group name"));
            }
        }
        if f.filter.starts_with('$') && f.share.is_some() {
            return Err((invalid, "a shared subscription to `$` topics"));
        }
        if f.filter.starts_with('$') {
            return Err((
                SubscribeReasonCode::NotAuthorized,
                "`$` topics are reserved (there is no $SYS tree; see the stats topic)",
            ));
        }
        crate::acl::check_filter(f.filter).map_err(|why| (invalid, why))?;
        if !self
            .shared
            .config
            .acl
            .can_subscribe(self.principal(), f.filter)
        {
            return Err((SubscribeReasonCode::NotAuthorized, "denied by ACL"));
        }
        if self.shared.router.subscription_count() >= self.shared.config.max_filters {
            return Err((
                SubscribeReasonCode::QuotaExceeded,
                "max_filters subscriptions held (all clients together)",
            ));
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, unsub: protocol::Unsubscribe) -> Result<(), End> {
        let reasons = unsub
            .filters
            .iter()
            .map(|full| match Filter::parse(full) {
                Some(f) if self.shared.router.unsubscribe(&self.session, f) => {
                    UnsubAckReason::Success
                }
                _ => UnsubAckReason::NoSubscriptionExisted,
            })
            .collect();
        self.shared.stats.filters.store(
            self.shared.router.subscription_count() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.encode(Packet::UnsubAck(
            UnsubAck {
                pkid: unsub.pkid,
                reasons,
            },
            None,
        ))
    }
}

fn empty_props() -> PublishProperties {
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
