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
    Disconnect, DisconnectReasonCode, Packet, PingResp, PubComp, PubCompReason, PubRecReason,
    PubRel, PubRelReason,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};

use crate::acl::Principal;
use crate::frame::{self, kind, Check, Frame};
use crate::peer::{End, Throttle, Version};
use crate::router::session::{Full, Out, Queued, Session};
use crate::stats::add;
use crate::strict;
use crate::Shared;
use edgebus_proto::policy::TokenBucket;

mod inbound;
mod outbound;

/// Acknowledgements that may wait for the store before the connection stops reading.
const MAX_WAITING_ACKS: usize = 1024;

/// Completes when the store commits more (never, with persistence off).
async fn commit(committed: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match committed {
        Some(c) => {
            if c.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

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
    /// The acknowledgement of the PUBLISH being routed, and the store's sequence number it
    /// waits for when the PUBLISH changed a retained message.
    pending_ack: Option<(Packet, Option<u64>)>,
    /// Acknowledgements waiting for the store's commit, in the order their PUBLISHes came
    /// [MQTT-4.6.0-2]; one that waits for nothing waits behind those before it.
    acks: VecDeque<(u64, Packet)>,
    /// The store's committed sequence number (none: persistence off).
    committed: Option<tokio::sync::watch::Receiver<u64>>,
    /// Session Expiry Interval the client asked for (MQTT 5; DISCONNECT may change it).
    pub expiry: u32,
    /// What the client's token grants beyond the configured ACL.
    pub grants: Arc<[crate::acl::AclRule]>,
    /// When the client's token expires, ending the connection.
    pub expires: Option<Instant>,
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
            acks: VecDeque::new(),
            committed: shared.store.get().map(|s| s.committed()),
            expiry: hello.expiry,
            grants: Arc::from([]),
            expires: None,
            shared,
        }
    }

    fn principal(&self) -> Principal<'_> {
        Principal {
            user: self.user.as_deref(),
            client_id: &self.client_id,
            grants: &self.grants,
        }
    }

    pub fn encode(&mut self, packet: Packet) -> Result<(), End> {
        let packet = if self.version == Version::V311 {
            crate::peer::strip_properties(packet)
        } else {
            packet
        };
        self.version
            .encode(packet, &mut self.out)
            .map_err(|e| End::Protocol(format!("cannot encode a packet for this client: {e}")))
    }

    /// Sends the acknowledgement of a PUBLISH once the store's commit `seq` (if any) is on
    /// disk, and after the acknowledgements before it.
    pub(super) fn ack(&mut self, packet: Packet, seq: Option<u64>) -> Result<(), End> {
        let need = seq.unwrap_or(0);
        if self.acks.is_empty() && need <= self.committed_now() {
            return self.encode(packet);
        }
        self.acks.push_back((need, packet));
        Ok(())
    }

    /// Sends the acknowledgements whose commit is on disk, in order.
    fn release_acks(&mut self) -> Result<(), End> {
        let done = self.committed_now();
        while self.acks.front().is_some_and(|(need, _)| *need <= done) {
            if let Some((_, packet)) = self.acks.pop_front() {
                self.encode(packet)?;
            }
        }
        Ok(())
    }

    fn committed_now(&self) -> u64 {
        self.committed.as_ref().map_or(u64::MAX, |c| *c.borrow())
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
        let mut committed = self.committed.clone();
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
            // Every whole frame already buffered, until a PUBLISH has to wait for room, or
            // too many acknowledgements wait for the disk.
            while self.pending.is_empty() && self.acks.len() < MAX_WAITING_ACKS {
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
            if let Err(end) = self.release_acks() {
                return end;
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
                _ = commit(&mut committed), if !self.acks.is_empty() => {}
                _ = sleep_until(deadline), if !self.keep_alive.is_zero() => {
                    return End::KeepAlive;
                }
                _ = sleep_until(self.expires.unwrap_or(deadline)), if self.expires.is_some() => {
                    return End::TokenExpired;
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
                    Ok(seq) => {
                        self.recorded(seq);
                        break;
                    }
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
        if let Some((ack, seq)) = self.pending_ack.take() {
            self.ack(ack, seq)?;
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
        if let Some((Packet::PubRec(rec, _), _)) = self.pending_ack.take() {
            self.session.release_qos2(rec.pkid);
        }
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
                    // A journaled message's PUBREC is on disk before its PUBREL goes: after
                    // a restart the PUBREL is sent again, not the PUBLISH.
                    let known = self.session.received(rec.pkid);
                    let rel = Packet::PubRel(
                        PubRel {
                            pkid: rec.pkid,
                            reason: if known.is_some() {
                                PubRelReason::Success
                            } else {
                                // MQTT 5 §3.6.2.1.
                                PubRelReason::PacketIdentifierNotFound
                            },
                        },
                        None,
                    );
                    self.ack(rel, known.flatten())
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
}
