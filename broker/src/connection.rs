//! One client connection: our own link between a socket and rumqttd's router.
//!
//! rumqttd's `Server` owns its accept loop (so no TCP_NODELAY), serves one MQTT version per
//! port, and its per-connection code can poison a shared mutex (facts §2.5). This task replaces
//! that code with ours while keeping rumqttd's codecs and router:
//!
//! - the CONNECT picks the codec (3.1.1 or 5) for the rest of the connection;
//! - client id, credentials and the connection limit are checked before the router hears of
//!   the client, and refused with a CONNACK code;
//! - every packet is framed and type-checked here before a codec sees it, and codec calls run
//!   under `catch_unwind`: a bad packet closes this connection with a logged reason;
//! - SUBSCRIBE and PUBLISH pass the ACL; refusals are answered here (SUBACK 0x80, PUBACK 0x87);
//! - MQTT 5 properties are removed from what a 3.1.1 client receives;
//! - PINGREQ and UNSUBSCRIBE are answered here; Last Wills are published here.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use rumqttd::local::LinkRx;
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    LastWill, LastWillProperties, Packet, PingResp, Protocol, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PublishProperties, SubAck, SubscribeReasonCode, UnsubAck,
    UnsubAckReason,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, warn, Instrument};

use crate::acl::Principal;
use crate::admission;
use crate::frame::{self, kind, Check, Frame};
use crate::sessions::persistent_name;
use crate::stats::{add, bump};
use crate::strict;
use crate::system::SysMsg;
use crate::Shared;
use edgebus_runtime::policy::TokenBucket;

/// Which MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V311,
    V5,
}

impl Version {
    fn decode(self, buf: &mut BytesMut, max: usize) -> Result<Packet, String> {
        // rumqttd's codecs have `unreachable!()` arms; a panic here must cost one connection.
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| match self {
            Version::V311 => protocol::v4::V4.read_mut(buf, max),
            Version::V5 => protocol::v5::V5.read_mut(buf, max),
        }));
        match r {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("codec panicked on this packet".into()),
        }
    }

    fn encode(self, packet: Packet, out: &mut BytesMut) -> Result<(), String> {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| match self {
            Version::V311 => protocol::v4::V4.write(packet, out),
            Version::V5 => protocol::v5::V5.write(packet, out),
        }));
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("codec panicked writing this packet".into()),
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT; `with_will` for MQTT 5 reason 0x04.
    Disconnect { with_will: bool },
    /// The socket closed or failed.
    Closed(String),
    /// The client broke the protocol.
    Protocol(String),
    /// No packet within 1.5 × keep-alive.
    KeepAlive,
    /// Another connection took over the client id.
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
    /// The router dropped the connection.
    Router(String),
    /// The client read nothing for `write_timeout`.
    Stalled(String),
}

/// Serves one accepted socket until it closes.
/// `local` and `peer` are the two ends of the TCP connection under `stream`.
pub(crate) async fn serve<S>(stream: S, local: SocketAddr, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!("conn", %peer, client_id = tracing::field::Empty);
    serve_inner(stream, local, peer, shared)
        .instrument(span)
        .await;
}

async fn serve_inner<S>(mut stream: S, local: SocketAddr, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = &shared.config;
    let max = cfg.max_payload.as_usize();
    let mut rbuf = BytesMut::with_capacity(256);

    // 1. The first packet must be a CONNECT, within connect_timeout.
    let first = match timeout(cfg.connect_timeout, read_frame(&mut stream, &mut rbuf, max)).await {
        Ok(Ok(f)) => f,
        Ok(Err(why)) => {
            debug!(reason = %why, "closed before CONNECT");
            return;
        }
        Err(_) => {
            info!("no CONNECT within {:?}; closing", cfg.connect_timeout);
            return;
        }
    };
    if first.kind() != kind::CONNECT {
        bump(&shared.stats.protocol_errors);
        warn!(
            "first packet was {}, expected CONNECT; closing",
            frame::kind_name(first.kind())
        );
        return;
    }
    let version = match frame::connect_level(&rbuf, first) {
        Some(4) => Version::V311,
        Some(5) => Version::V5,
        level => {
            bump(&shared.stats.refused);
            warn!(
                ?level,
                "unsupported protocol level (MQTT 3.1.1 and 5 are served); refusing"
            );
            let _ = stream.write_all(&[0x20, 2, 0, 1]).await;
            return;
        }
    };
    if let Err(why) = strict::check(&rbuf, first, version == Version::V5) {
        bump(&shared.stats.protocol_errors);
        warn!(reason = %why, "CONNECT breaks the protocol; closing");
        Box::pin(refuse(&mut stream, version, Refusal::Malformed)).await;
        return;
    }
    let packet = match version.decode(&mut rbuf, max) {
        Ok(p) => p,
        Err(e) => {
            bump(&shared.stats.protocol_errors);
            warn!(reason = %e, "malformed CONNECT; closing");
            Box::pin(refuse(&mut stream, version, Refusal::Malformed)).await;
            return;
        }
    };
    let Packet::Connect(connect, props, will, will_props, login) = packet else {
        return;
    };

    // 2. Client id.
    let mut client_id = connect.client_id;
    let assigned = client_id.is_empty();
    if assigned {
        if !connect.clean_session {
            bump(&shared.stats.refused);
            warn!("empty client id with a persistent session; refusing");
            Box::pin(refuse(&mut stream, version, Refusal::BadClientId)).await;
            return;
        }
        client_id = format!("auto-{:016x}", random_u64());
    } else if let Err(why) = check_client_id(&client_id) {
        bump(&shared.stats.refused);
        tracing::Span::current().record("client_id", clip(&client_id).as_ref());
        warn!(reason = why, "invalid client id; refusing");
        Box::pin(refuse(&mut stream, version, Refusal::BadClientId)).await;
        return;
    }
    tracing::Span::current().record("client_id", client_id.as_str());

    // 3. Credentials.
    let user = match authenticate(&shared, peer, login.as_ref()) {
        Ok(user) => user,
        Err(refusal) => {
            bump(&shared.stats.refused);
            warn!(
                ?refusal,
                user = login.as_ref().map(|l| clip(&l.username)).as_deref(),
                "authentication failed; refusing"
            );
            Box::pin(refuse(&mut stream, version, refusal)).await;
            return;
        }
    };

    // 4. The Last Will: the checks a PUBLISH to its topic would pass, now rather than when
    // it fires, so that no client can publish through its will what it may not publish
    // itself (a wildcard, a `$` topic, another user's topic).
    if let Some(w) = &will {
        let who = Principal {
            user: user.as_deref(),
            client_id: &client_id,
        };
        if let Err((refusal, why)) = check_will(&shared, who, w) {
            bump(&shared.stats.refused);
            warn!(
                topic = %clip(&String::from_utf8_lossy(&w.topic)),
                user = user.as_deref(),
                reason = why,
                "Last Will refused; refusing the connection"
            );
            Box::pin(refuse(&mut stream, version, refusal)).await;
            return;
        }
    }

    // 5. Connection limits.
    let holder = match &user {
        Some(u) => admission::Holder::User(u.clone()),
        None => admission::Holder::Address(peer.ip().to_canonical()),
    };
    let _slot = match shared
        .admission
        .admit(shared.limits, holder, &shared.stats, local, peer)
    {
        Ok(slot) => slot,
        Err(full) => {
            bump(&shared.stats.refused);
            shared.refusals.note(peer.ip(), full.setting());
            Box::pin(refuse(&mut stream, version, Refusal::Busy)).await;
            return;
        }
    };
    bump(&shared.stats.connections_total);

    // 6. Take the client id over from an earlier connection of the same identity, then join
    // the router.
    let claim = match Box::pin(shared.sessions.claim(&client_id, user.as_deref())).await {
        Ok(claim) => claim,
        Err(_) => {
            bump(&shared.stats.refused);
            warn!(
                user = user.as_deref(),
                "client id is connected under another identity; refusing"
            );
            Box::pin(refuse(&mut stream, version, Refusal::NotAuthorized)).await;
            return;
        }
    };
    let session = persistent_name(&client_id, user.as_deref());
    let clean = connect.clean_session;
    let slot = clean.then(|| shared.sessions.take_slot());
    let router_name = match slot {
        Some(n) => format!("{}c{n}", shared.router_prefix),
        None => format!("{}{session}", shared.router_prefix),
    };
    // Known before the router hears of the client: a resumed session may skip messages at once.
    shared.names.insert(router_name.clone(), client_id.clone());
    let alias_max = props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    // The error as text at once: rumqttd's LinkError carries a whole connection (kilobytes),
    // which would otherwise sit in this future, for every connection, for its whole life.
    let joined = (shared.links)(
        &router_name,
        clean,
        if version == Version::V5 { alias_max } else { 0 },
    )
    .map_err(|e| e.to_string());

    let mut end = End::Router("not joined".into());
    let mut conn_will = will.map(|w| (w, will_props));
    if let Ok((link_tx, mut link_rx, notification)) = joined {
        let session_present = match Option::<Packet>::from(notification) {
            Some(Packet::ConnAck(ack, _)) => ack.session_present,
            _ => false,
        };
        let mut conn = Conn {
            version,
            shared: shared.clone(),
            user,
            client_id: client_id.clone(),
            link_tx,
            out: BytesMut::new(),
            to_router: Vec::new(),
            pending_subacks: HashMap::new(),
            denied_qos2: HashSet::new(),
            aliases: HashMap::new(),
            keep_alive: Duration::from_secs(u64::from(connect.keep_alive)),
            router_open: true,
            limits: Limits::new(&shared.config.rate_limit),
            denied_log: Throttle::default(),
        };
        conn.connack(session_present, assigned.then(|| client_id.clone()));
        debug!(
            ?version,
            clean,
            session_present,
            keep_alive = connect.keep_alive,
            "connected"
        );
        // Boxed: the serving loop's state is the largest part of this future, and an
        // unboxed one would be allocated (and copied) for every socket, CONNECT or not.
        let run = AssertUnwindSafe(Box::pin(conn.run(
            &mut stream,
            &mut rbuf,
            &mut link_rx,
            &claim,
        )))
        .catch_unwind()
        .await;
        end = match run {
            Ok(end) => end,
            Err(_) => End::Protocol("connection task panicked".into()),
        };
        // The will is the connection's last publish, and counts against its rate limit.
        if let Some((w, _)) = &conn_will {
            if !conn.limits.admit(w.message.len()) {
                bump(&shared.stats.rate_limited);
                warn!(
                    topic = %clip(&String::from_utf8_lossy(&w.topic)),
                    "Last Will over the client's publish rate limit; not published"
                );
                conn_will = None;
            }
        }
        // After DISCONNECT the router already dropped the connection.
        if conn.router_open && !matches!(end, End::Disconnect { .. }) {
            // Tell the router the client is gone (it saves a persistent session).
            let _ = Box::pin(conn.link_tx.send(Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            )))
            .await;
        }
        if !matches!(end, End::Disconnect { .. } | End::TakenOver | End::Shutdown) {
            // Best effort: the server closes, so tell an MQTT 5 client why.
            if version == Version::V5 {
                let code = match &end {
                    End::Protocol(_) => DisconnectReasonCode::ProtocolError,
                    End::KeepAlive => DisconnectReasonCode::KeepAliveTimeout,
                    _ => DisconnectReasonCode::UnspecifiedError,
                };
                conn.disconnect_v5(code);
                let _ = Box::pin(timeout(
                    Duration::from_millis(100),
                    stream.write_all(&conn.out),
                ))
                .await;
            }
        }
    } else if let Err(e) = joined {
        warn!(error = %e, "router refused the connection");
        Box::pin(refuse(&mut stream, version, Refusal::Busy)).await;
    }

    match &end {
        End::Disconnect { .. } | End::TakenOver | End::Shutdown => {
            debug!(reason = ?end, "connection closed")
        }
        End::Closed(why) => debug!(reason = %why, "connection lost"),
        End::Stalled(why) => warn!(reason = %why, "client stopped reading; closing"),
        End::Protocol(why) => {
            bump(&shared.stats.protocol_errors);
            warn!(reason = %why, "closing connection")
        }
        End::KeepAlive => info!("keep-alive expired; closing"),
        End::Router(why) => info!(reason = %why, "router closed the connection"),
    }

    // 6. The Last Will: not after a normal DISCONNECT, nor when the whole broker stops.
    let fire = match end {
        End::Disconnect { with_will } => with_will,
        End::Shutdown => false,
        _ => true,
    };
    if let (true, Some((will, will_props))) = (fire, conn_will.take()) {
        let session_expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);
        let delay = will_props
            .as_ref()
            .and_then(|p| p.delay_interval)
            .unwrap_or(0)
            .min(session_expiry);
        publish_will(&shared, &session, will, will_props, delay);
    }

    // 7. Give back what this connection held.
    shared
        .names
        .remove_if(&router_name, |_, owner| *owner == client_id);
    if let Some(n) = slot {
        shared.sessions.give_slot(n);
    }
    shared.sessions.release(&client_id, claim.generation);
    drop(claim.done);
}

fn publish_will(
    shared: &Arc<Shared>,
    session: &str,
    will: LastWill,
    props: Option<LastWillProperties>,
    delay_s: u32,
) {
    let props = props.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    });
    let msg = SysMsg::Publish {
        topic: will.topic,
        payload: will.message,
        retain: will.retain,
        props,
    };
    if delay_s == 0 {
        bump(&shared.stats.wills);
        shared.sys.send(msg);
        return;
    }
    let (generation, cancel) = shared.sessions.delay_will(session);
    let shared = shared.clone();
    let session = session.to_owned();
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(u64::from(delay_s))) => {
                bump(&shared.stats.wills);
                shared.sys.send(msg);
            }
        }
        shared.sessions.will_done(&session, generation);
    });
}

/// Reads until a whole frame is buffered.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Frame, String> {
    loop {
        match frame::check(buf, max) {
            Check::Ready(f) => return Ok(f),
            Check::Incomplete => {}
            Check::TooLarge(n) => return Err(format!("packet of {n} bytes exceeds max_payload")),
            Check::Malformed => return Err("malformed remaining length".into()),
        }
        buf.reserve(256);
        match stream.read_buf(buf).await {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// MQTT allows almost any client id; these characters would let a client escape its `%c`
/// namespace in ACL patterns and topics, so they are refused (as mosquitto does for ACLs).
fn check_client_id(id: &str) -> Result<(), &'static str> {
    if id.contains(['/', '+', '#']) {
        return Err("client ids may not contain `/`, `+` or `#`");
    }
    if id.chars().any(char::is_control) {
        return Err("client ids may not contain control characters");
    }
    if id.len() > 256 {
        return Err("client ids are limited to 256 bytes");
    }
    Ok(())
}

fn authenticate(
    shared: &Shared,
    peer: SocketAddr,
    login: Option<&protocol::Login>,
) -> Result<Option<String>, Refusal> {
    use crate::config::Anonymous;
    match (login, &shared.passwords) {
        (Some(l), Some(file)) => {
            if file.verify(&l.username, l.password.as_bytes()) {
                Ok(Some(l.username.clone()))
            } else {
                Err(Refusal::BadCredentials)
            }
        }
        // Without a password file a username proves nothing: the client is anonymous.
        _ => {
            let loopback = peer.ip().to_canonical().is_loopback();
            match shared.config.auth.anonymous {
                Anonymous::Allow => Ok(None),
                Anonymous::Loopback if loopback => Ok(None),
                _ => Err(Refusal::NotAuthorized),
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Refusal {
    Malformed,
    TopicInvalid,
    BadClientId,
    BadCredentials,
    NotAuthorized,
    Busy,
}

/// Writes a refusing CONNACK by hand: rumqttd's 3.1.1 codec cannot write every code.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, version: Version, why: Refusal) {
    let bytes: &[u8] = match (version, why) {
        // 3.1.1 has no code for these: the connection is closed [MQTT-3.1.4-1].
        (Version::V311, Refusal::Malformed | Refusal::TopicInvalid) => return,
        (Version::V311, Refusal::BadClientId) => &[0x20, 2, 0, 0x02],
        (Version::V311, Refusal::Busy) => &[0x20, 2, 0, 0x03],
        (Version::V311, Refusal::BadCredentials) => &[0x20, 2, 0, 0x04],
        (Version::V311, Refusal::NotAuthorized) => &[0x20, 2, 0, 0x05],
        (Version::V5, Refusal::Malformed) => &[0x20, 3, 0, 0x81, 0],
        (Version::V5, Refusal::BadClientId) => &[0x20, 3, 0, 0x85, 0],
        (Version::V5, Refusal::TopicInvalid) => &[0x20, 3, 0, 0x90, 0],
        (Version::V5, Refusal::BadCredentials) => &[0x20, 3, 0, 0x86, 0],
        (Version::V5, Refusal::NotAuthorized) => &[0x20, 3, 0, 0x87, 0],
        (Version::V5, Refusal::Busy) => &[0x20, 3, 0, 0x97, 0],
    };
    let _ = timeout(Duration::from_secs(1), async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await;
}

/// What a client sent, cut to a length fit for a log line (a client id or topic can be
/// 64 KiB).
pub(crate) fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 96;
    if s.len() <= MAX {
        return s.into();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len()).into()
}

/// Checks a Last Will as a PUBLISH to its topic would be checked.
fn check_will(
    shared: &Shared,
    who: Principal<'_>,
    will: &LastWill,
) -> Result<(), (Refusal, &'static str)> {
    let topic = strict::topic_name(&will.topic).map_err(|why| (Refusal::TopicInvalid, why))?;
    if topic.starts_with('$') {
        return Err((
            Refusal::NotAuthorized,
            "topics starting with `$` are reserved",
        ));
    }
    if !shared.config.acl.can_publish(who, topic) {
        return Err((Refusal::NotAuthorized, "denied by ACL"));
    }
    Ok(())
}

/// Lets a repeated event be logged at most once a second, with the count in between.
#[derive(Default)]
pub(crate) struct Throttle {
    since: u64,
    last: Option<Instant>,
}

impl Throttle {
    /// Counts one event; `Some(events since the last line, this one included)` when a line
    /// is due.
    pub fn tick(&mut self) -> Option<u64> {
        self.since += 1;
        if self
            .last
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // Fall back to the clock: assigned ids only need to be unique, not secret.
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

/// A connected client.
struct Conn {
    version: Version,
    shared: Arc<Shared>,
    user: Option<String>,
    client_id: String,
    link_tx: rumqttd::local::LinkTx,
    /// Bytes waiting to be written to the client.
    out: BytesMut,
    /// Packets waiting to be handed to the router.
    to_router: Vec<Packet>,
    /// SUBSCRIBEs with refused filters: the verdicts to merge into the router's SUBACK.
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// QoS 2 publishes refused from a 3.1.1 client: their PUBREL is answered here.
    denied_qos2: HashSet<u16>,
    /// MQTT 5 topic aliases the client set, so the ACL sees the real topic.
    aliases: HashMap<u16, Bytes>,
    keep_alive: Duration,
    router_open: bool,
    limits: Limits,
    /// Refused publishes not yet logged.
    denied_log: Throttle,
}

/// A connection's publish rate limits, and the drops not yet logged.
struct Limits {
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
    fn admit(&mut self, len: usize) -> bool {
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

/// Notifications handled per wake-up before the socket is written.
const NOTIFICATION_BATCH: usize = 256;

impl Conn {
    fn principal(&self) -> Principal<'_> {
        Principal {
            user: self.user.as_deref(),
            client_id: &self.client_id,
        }
    }

    fn encode(&mut self, packet: Packet) -> Result<(), End> {
        let packet = if self.version == Version::V311 {
            strip_properties(packet)
        } else {
            packet
        };
        self.version
            .encode(packet, &mut self.out)
            .map_err(|e| End::Protocol(format!("cannot encode a packet for this client: {e}")))
    }

    fn connack(&mut self, session_present: bool, assigned: Option<String>) {
        let ack = ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        };
        let props = (self.version == Version::V5).then(|| ConnAckProperties {
            assigned_client_identifier: assigned,
            topic_alias_max: Some(4096),
            max_packet_size: Some(
                u32::try_from(self.shared.config.max_payload.0 + 5).unwrap_or(u32::MAX),
            ),
            retain_available: Some(1),
            wildcard_subscription_available: Some(1),
            shared_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            ..ConnAckProperties::default()
        });
        if let Err(End::Protocol(e)) = self.encode(Packet::ConnAck(ack, props)) {
            warn!(error = %e, "cannot encode CONNACK");
        }
    }

    fn disconnect_v5(&mut self, reason_code: DisconnectReasonCode) {
        let _ = self.encode(Packet::Disconnect(Disconnect { reason_code }, None));
    }

    async fn run<S>(
        &mut self,
        stream: &mut S,
        rbuf: &mut BytesMut,
        link_rx: &mut LinkRx,
        claim: &crate::sessions::Claim,
    ) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let max = self.shared.config.max_payload.as_usize();
        let shutdown = self.shared.shutdown.clone();
        let grace = self.keep_alive + self.keep_alive / 2;
        let mut deadline = Instant::now() + grace;
        loop {
            // Handle every complete frame already buffered.
            loop {
                match frame::check(rbuf, max) {
                    Check::Incomplete => break,
                    Check::Ready(f) => {
                        if let Err(end) = self.on_frame(f, rbuf) {
                            let _ = self.flush_router().await;
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
                            "packet of {n} bytes exceeds max_payload ({} bytes)",
                            max
                        ));
                    }
                    Check::Malformed => {
                        return End::Protocol("malformed remaining length".into());
                    }
                }
            }
            if let Err(end) = self.flush_router().await {
                return end;
            }
            if let Err(end) = self.write_out(stream, claim).await {
                return end;
            }
            if rbuf.is_empty() && rbuf.capacity() > 64 * 1024 {
                *rbuf = BytesMut::new();
            }
            if rbuf.capacity() - rbuf.len() < 256 {
                rbuf.reserve(1024.max(rbuf.len()));
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
                r = stream.read_buf(rbuf) => match r {
                    Ok(0) => return End::Closed("closed by peer".into()),
                    Ok(n) => {
                        add(&self.shared.stats.bytes_in, n);
                        deadline = Instant::now() + grace;
                    }
                    Err(e) => return End::Closed(e.to_string()),
                },
                n = link_rx.next() => {
                    let mut next = Some(n);
                    let mut handled = 0;
                    while let Some(n) = next.take() {
                        match n {
                            Ok(Some(notification)) => {
                                if let Err(end) = self.on_notification(notification, link_rx).await {
                                    let _ = self.write_out(stream, claim).await;
                                    return end;
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                self.router_open = false;
                                let _ = self.write_out(stream, claim).await;
                                return End::Router(e.to_string());
                            }
                        }
                        handled += 1;
                        if handled < NOTIFICATION_BATCH {
                            // Take what is already queued without waiting (flume's recv is
                            // cancel-safe, so dropping a pending poll loses nothing).
                            next = link_rx.next().now_or_never();
                        }
                    }
                }
                _ = sleep_until(deadline), if !self.keep_alive.is_zero() => {
                    return End::KeepAlive;
                }
            }
        }
    }

    /// Writes what is buffered, bounded by `write_timeout`, giving way to a takeover.
    async fn write_out<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        claim: &crate::sessions::Claim,
    ) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
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
        }
        add(&self.shared.stats.bytes_out, n);
        self.out.clear();
        if self.out.capacity() > 64 * 1024 {
            self.out = BytesMut::new();
        }
        Ok(())
    }

    /// Hands queued packets to the router with one wake-up.
    async fn flush_router(&mut self) -> Result<(), End> {
        let Some(last) = self.to_router.pop() else {
            return Ok(());
        };
        if !self.to_router.is_empty() {
            let mut buffer = self.link_tx.buffer();
            buffer.extend(self.to_router.drain(..));
        }
        self.link_tx.send(last).await.map_err(|e| {
            self.router_open = false;
            End::Router(e.to_string())
        })?;
        Ok(())
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
            kind::PUBLISH => {
                let qos = f.qos();
                if qos == 3 {
                    return Err(End::Protocol("PUBLISH with QoS 3".into()));
                }
                let pkid = frame::publish_topic_and_pkid(rbuf, f)
                    .map(|(_, pkid)| pkid)
                    .ok_or_else(|| End::Protocol("truncated PUBLISH".into()))?;
                let packet = self.decode(rbuf, max)?;
                let Packet::Publish(publish, props) = packet else {
                    return Err(End::Protocol("PUBLISH did not decode as one".into()));
                };
                self.on_publish(publish, props, qos, pkid)
            }
            kind::SUBSCRIBE => match self.decode(rbuf, max)? {
                Packet::Subscribe(sub, props) => self.on_subscribe(sub, props),
                _ => Err(End::Protocol("SUBSCRIBE did not decode as one".into())),
            },
            kind::UNSUBSCRIBE => match self.decode(rbuf, max)? {
                Packet::Unsubscribe(mut unsub, props) => {
                    let reasons = vec![UnsubAckReason::Success; unsub.filters.len()];
                    // rumqttd sends no UNSUBACK for a filter it does not know: answer here.
                    self.encode(Packet::UnsubAck(
                        UnsubAck {
                            pkid: unsub.pkid,
                            reasons,
                        },
                        None,
                    ))?;
                    for filter in &mut unsub.filters {
                        if let Some(rewritten) = share_group_for_router(filter) {
                            *filter = rewritten;
                        }
                    }
                    self.to_router.push(Packet::Unsubscribe(unsub, props));
                    Ok(())
                }
                _ => Err(End::Protocol("UNSUBSCRIBE did not decode as one".into())),
            },
            kind::PUBACK | kind::PUBREC | kind::PUBCOMP => {
                let p = self.decode(rbuf, max)?;
                self.to_router.push(p);
                Ok(())
            }
            kind::PUBREL => match self.decode(rbuf, max)? {
                Packet::PubRel(rel, _) => {
                    if self.denied_qos2.remove(&rel.pkid) {
                        self.encode(Packet::PubComp(
                            PubComp {
                                pkid: rel.pkid,
                                reason: PubCompReason::Success,
                            },
                            None,
                        ))
                    } else {
                        // The router ignores a PUBREL that carries properties.
                        self.to_router.push(Packet::PubRel(rel, None));
                        Ok(())
                    }
                }
                _ => Err(End::Protocol("PUBREL did not decode as one".into())),
            },
            kind::DISCONNECT => {
                let with_will = match self.decode(rbuf, max) {
                    Ok(Packet::Disconnect(d, _)) => {
                        d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage
                    }
                    _ => false,
                };
                self.to_router.push(Packet::Disconnect(
                    Disconnect {
                        reason_code: DisconnectReasonCode::NormalDisconnection,
                    },
                    None,
                ));
                Err(End::Disconnect { with_will })
            }
            kind::CONNECT => Err(End::Protocol("second CONNECT on one connection".into())),
            other => Err(End::Protocol(format!(
                "a client may not send {}",
                frame::kind_name(other)
            ))),
        }
    }

    fn decode(&mut self, rbuf: &mut BytesMut, max: usize) -> Result<Packet, End> {
        self.version
            .decode(rbuf, max)
            .map_err(|e| End::Protocol(format!("malformed packet: {e}")))
    }

    fn on_publish(
        &mut self,
        publish: protocol::Publish,
        props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
    ) -> Result<(), End> {
        let alias = props.as_ref().and_then(|p| p.topic_alias);
        let topic = if publish.topic.is_empty() {
            match alias.and_then(|a| self.aliases.get(&a)) {
                Some(t) => t.clone(),
                None => {
                    return Err(End::Protocol(
                        "PUBLISH with an empty topic and no known alias".into(),
                    ))
                }
            }
        } else {
            if let Some(a) = alias {
                if self.aliases.len() < 4096 {
                    self.aliases.insert(a, publish.topic.clone());
                }
            }
            publish.topic.clone()
        };
        let topic = strict::topic_name(&topic)
            .map_err(|why| End::Protocol(format!("invalid topic name: {why} [MQTT-3.3.2-1]")))?;
        if topic.starts_with('$') {
            return self.deny_publish(qos, pkid, topic, "topics starting with `$` are reserved");
        }
        if !self.shared.config.acl.can_publish(self.principal(), topic) {
            return self.deny_publish(qos, pkid, topic, "denied by ACL");
        }
        if !self.limits.admit(publish.payload.len()) {
            return self.rate_limited(qos, pkid, topic);
        }
        bump(&self.shared.stats.messages_in);
        self.to_router.push(Packet::Publish(publish, props));
        Ok(())
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
    /// with success to a 3.1.1 one (it has no way to say no), so the client moves on.
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
            2 => {
                if !v5 {
                    // 3.1.1 cannot refuse: finish the flow here so the client moves on.
                    self.denied_qos2.insert(pkid);
                }
                self.encode(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: if v5 { rec } else { PubRecReason::Success },
                    },
                    None,
                ))
            }
            _ => Ok(()),
        }
    }

    fn on_subscribe(
        &mut self,
        mut sub: protocol::Subscribe,
        props: Option<protocol::SubscribeProperties>,
    ) -> Result<(), End> {
        let n = sub.filters.len();
        let mut verdicts = Vec::with_capacity(n);
        let mut keep = Vec::with_capacity(n);
        // One log line per packet, however many filters it refuses.
        let mut first_refused: Option<(String, &'static str)> = None;
        for mut f in sub.filters.drain(..) {
            match self.admit_filter(&f.path) {
                Ok(router_path) => {
                    f.path = router_path;
                    verdicts.push(None);
                    keep.push(f);
                }
                Err((code, why)) => {
                    bump(&self.shared.stats.denied_subscribe);
                    first_refused.get_or_insert_with(|| (clip(&f.path).into_owned(), why));
                    verdicts.push(Some(if self.version == Version::V5 {
                        code
                    } else {
                        SubscribeReasonCode::Failure
                    }));
                }
            }
        }
        if let Some((filter, why)) = first_refused {
            warn!(
                refused = n - keep.len(),
                of = n,
                first = %filter,
                reason = why,
                user = self.user.as_deref(),
                "subscriptions refused"
            );
        }
        if keep.is_empty() {
            let return_codes = verdicts.into_iter().flatten().collect();
            return self.encode(Packet::SubAck(
                SubAck {
                    pkid: sub.pkid,
                    return_codes,
                },
                None,
            ));
        }
        if keep.len() < n {
            self.pending_subacks.insert(sub.pkid, verdicts);
        }
        sub.filters = keep;
        self.to_router.push(Packet::Subscribe(sub, props));
        Ok(())
    }

    /// Checks one filter; returns the path to give the router.
    fn admit_filter(&self, path: &str) -> Result<String, (SubscribeReasonCode, &'static str)> {
        let invalid = SubscribeReasonCode::TopicFilterInvalid;
        let (inner, router_path) = if let Some(rest) = path.strip_prefix("$share/") {
            let (group, inner) = rest
                .split_once('/')
                .ok_or((invalid, "shared subscription without a filter"))?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err((invalid, "bad shared subscription group name"));
            }
            let rewritten = share_group_for_router(path).unwrap_or_else(|| path.to_owned());
            (inner, rewritten)
        } else {
            (path, path.to_owned())
        };
        if inner.starts_with('$') {
            return Err((
                SubscribeReasonCode::NotAuthorized,
                "`$` topics are reserved (there is no $SYS tree; see the stats topic)",
            ));
        }
        crate::acl::check_filter(inner).map_err(|why| (invalid, why))?;
        if !self
            .shared
            .config
            .acl
            .can_subscribe(self.principal(), inner)
        {
            return Err((SubscribeReasonCode::NotAuthorized, "denied by ACL"));
        }
        if !self.shared.admit_filter(inner) {
            return Err((
                SubscribeReasonCode::QuotaExceeded,
                "max_filters reached (rumqttd never frees a filter)",
            ));
        }
        Ok(router_path)
    }

    async fn on_notification(
        &mut self,
        notification: Notification,
        link_rx: &mut LinkRx,
    ) -> Result<(), End> {
        match notification {
            Notification::Forward(forward) => {
                let mut props = forward.properties;
                if self.version == Version::V311 && props.is_some() {
                    props = None;
                    bump(&self.shared.stats.properties_stripped);
                }
                bump(&self.shared.stats.messages_out);
                self.encode(Packet::Publish(forward.publish, props))
            }
            Notification::Unschedule => link_rx.wake().await.map_err(|e| {
                self.router_open = false;
                End::Router(e.to_string())
            }),
            Notification::Disconnect(d, props) => {
                self.router_open = false;
                if self.version == Version::V5 {
                    self.encode(Packet::Disconnect(d.clone(), props))?;
                }
                Err(End::Router(format!(
                    "router sent DISCONNECT ({:?})",
                    d.reason_code
                )))
            }
            ack @ Notification::DeviceAck(_) => match Option::<Packet>::from(ack) {
                Some(Packet::SubAck(mut suback, props)) => {
                    if let Some(verdicts) = self.pending_subacks.remove(&suback.pkid) {
                        let mut granted = suback.return_codes.into_iter();
                        suback.return_codes = verdicts
                            .into_iter()
                            .map(|v| {
                                v.or_else(|| granted.next())
                                    .unwrap_or(SubscribeReasonCode::Failure)
                            })
                            .collect();
                    }
                    self.encode(Packet::SubAck(suback, props))
                }
                // Answered when the request came in.
                Some(Packet::UnsubAck(..) | Packet::PingResp(_) | Packet::ConnAck(..)) | None => {
                    Ok(())
                }
                Some(p) => self.encode(p),
            },
            _ => Ok(()),
        }
    }
}

/// rumqttd keys a shared group by its name alone, so one group name on two filters splits
/// messages between them (facts §2.2). Give the router a group name per (group, filter).
fn share_group_for_router(path: &str) -> Option<String> {
    let rest = path.strip_prefix("$share/")?;
    let (group, filter) = rest.split_once('/')?;
    // FNV-1a: stable across runs and processes, so every member maps the same way.
    let hash = filter.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    Some(format!("$share/{group}~{hash:016x}/{filter}"))
}

/// Removes everything MQTT 3.1.1 cannot carry.
fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert!(check_client_id("sensor-1").is_ok());
        assert!(check_client_id("bad/id").is_err());
        assert!(check_client_id("a+b").is_err());
        assert!(check_client_id("#").is_err());
        assert!(check_client_id("nul\0").is_err());
    }

    #[test]
    fn share_groups_are_per_filter() {
        let a = share_group_for_router("$share/g/a/#").expect("shared");
        let b = share_group_for_router("$share/g/b/#").expect("shared");
        assert!(a.starts_with("$share/g~") && a.ends_with("/a/#"), "{a}");
        assert_ne!(a.split('/').nth(1), b.split('/').nth(1));
        assert_eq!(share_group_for_router("a/b"), None);
    }
}
