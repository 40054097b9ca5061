//! One client connection, up to its CONNACK, and what happens when it ends.
//!
//! - the CONNECT picks the codec (3.1.1 or 5) for the rest of the connection;
//! - the CONNECT's bytes pass the specification's checks (`strict`) before the codec;
//! - client id, credentials, the Last Will and the connection limits are checked before the
//!   client gets a session, and refused with a CONNACK code;
//! - the client id is claimed (a takeover within one identity), the session opened, and the
//!   connection served by `client::Conn`;
//! - at the end, the Last Will (with its delay), and the session left to end or to wait.
//!
//! Codec calls run under `catch_unwind`: a packet that makes a codec panic costs its
//! connection only.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, ConnectReturnCode, DisconnectReasonCode, LastWill, Packet,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tracing::{debug, info, warn, Instrument};

use crate::acl::Principal;
use crate::admission;
use crate::client;
use crate::frame::{self, kind, Check, Frame};
use crate::peer::{clip, End, Version};
use crate::sessions::persistent_name;
use crate::stats::bump;
use crate::strict;
use crate::Shared;

/// Serves one accepted socket until it closes.
/// `local` and `peer` are the two ends of the TCP connection under `stream`.
/// `certified` is the username a verified client certificate stands for, when the TLS
/// listener takes it as the login.
pub(crate) async fn serve<S>(
    stream: S,
    local: SocketAddr,
    peer: SocketAddr,
    shared: Arc<Shared>,
    certified: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!("conn", %peer, client_id = tracing::field::Empty);
    serve_inner(stream, local, peer, shared, certified)
        .instrument(span)
        .await;
}

async fn serve_inner<S>(
    mut stream: S,
    local: SocketAddr,
    peer: SocketAddr,
    shared: Arc<Shared>,
    certified: Option<String>,
) where
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
    let Identity {
        user,
        grants,
        expires,
    } = match authenticate(&shared, peer, login.as_ref(), certified) {
        Ok(identity) => identity,
        Err((refusal, why)) => {
            bump(&shared.stats.refused);
            warn!(
                ?refusal,
                user = login.as_ref().map(|l| clip(&l.username)).as_deref(),
                reason = why,
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
            grants: &grants,
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

    // 6. Take the client id over from an earlier connection of the same identity, then
    // open its session.
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
    let key = persistent_name(&client_id, user.as_deref());
    let cap = u32::try_from(cfg.max_session_expiry.as_secs()).unwrap_or(u32::MAX);
    // 3.1.1: a persistent session lasts max_session_expiry; MQTT 5: what the client asks,
    // up to that [MQTT-3.1.2-23].
    let expiry = match (version, connect.clean_session) {
        (Version::V311, true) => 0,
        (Version::V311, false) => cap,
        (Version::V5, _) => props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0)
            .min(cap),
    };
    let (session, session_present) =
        shared
            .router
            .open(&key, &client_id, user.as_deref(), connect.clean_session);
    session.set_grants(grants.clone());
    shared.count_sessions();
    // The keep-alive that applies: the client's, unless above `max_keepalive` (or none at
    // all while there is a maximum); MQTT 5 clients are told in the CONNACK [MQTT-3.2.2-21].
    let max_ka = cfg.max_keepalive;
    let keep_alive = if max_ka > 0 && (connect.keep_alive == 0 || connect.keep_alive > max_ka) {
        max_ka
    } else {
        connect.keep_alive
    };
    let hello = client::Hello {
        keep_alive,
        alias_max: props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0),
        max_packet: props.as_ref().and_then(|p| p.max_packet_size),
        expiry,
    };
    let window = match version {
        Version::V5 => props
            .as_ref()
            .and_then(|p| p.receive_maximum)
            .unwrap_or(u16::MAX),
        Version::V311 => V311_WINDOW,
    };
    let (attachment, resend) = shared.router.attach(
        &key,
        &session,
        window,
        Duration::from_secs(u64::from(expiry)),
    );
    let mut conn = client::Conn::new(
        version,
        shared.clone(),
        user,
        client_id.clone(),
        session.clone(),
        hello,
    );
    conn.grants = grants;
    conn.expires = expires.map(|at| {
        // Far enough for any token, near enough not to overflow an Instant.
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(10 * 365 * 86_400));
        tokio::time::Instant::now() + left
    });
    let server_keep_alive = (keep_alive != connect.keep_alive).then_some(keep_alive);
    connack(
        &mut conn,
        session_present,
        assigned.then(|| client_id.clone()),
        server_keep_alive,
    );
    debug!(
        ?version,
        clean = connect.clean_session,
        session_present,
        keep_alive = connect.keep_alive,
        "connected"
    );
    let mut conn_will = will.map(|w| (w, will_props));
    // Boxed: the serving loop's state is the largest part of this future, and an unboxed one
    // would be allocated (and copied) for every socket, CONNECT or not.
    let run = AssertUnwindSafe(Box::pin(conn.run(&mut stream, &mut rbuf, &claim, resend)))
        .catch_unwind()
        .await;
    let end = match run {
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
    if !matches!(
        end,
        End::Disconnect { .. } | End::TakenOver | End::Shutdown | End::Stalled(_)
    ) && version == Version::V5
    {
        // Best effort: the server closes, so tell an MQTT 5 client why.
        let code = match &end {
            End::Protocol(_) => DisconnectReasonCode::ProtocolError,
            End::KeepAlive => DisconnectReasonCode::KeepAliveTimeout,
            // "The maximum connection time authorized for this connection has been
            // exceeded" (MQTT 5 §3.14.2.1, 0xA0): its token's.
            End::TokenExpired => DisconnectReasonCode::MaximumConnectTime,
            _ => DisconnectReasonCode::UnspecifiedError,
        };
        conn.disconnect_v5(code);
        let _ = Box::pin(timeout(
            Duration::from_millis(100),
            stream.write_all(&conn.out),
        ))
        .await;
    }
    let expiry = conn.expiry;
    drop(conn);

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
        End::TokenExpired => info!("token expired; closing"),
    }

    // 7. The Last Will: not after a normal DISCONNECT, nor when the whole broker stops. On a
    // takeover a delayed will is never due: the session goes on at once [MQTT-3.1.3-9].
    if let Some((will, will_props)) = conn_will.take() {
        let delay = will_props
            .as_ref()
            .and_then(|p| p.delay_interval)
            .unwrap_or(0)
            .min(expiry);
        let fire = match end {
            End::Disconnect { with_will } => with_will,
            End::Shutdown => false,
            End::TakenOver => delay == 0,
            _ => true,
        };
        if fire {
            crate::will::publish(&shared, &key, will, will_props, delay);
        }
    }

    // 8. Leave the session: it ends now, or waits `expiry` for its client.
    shared.router.close(
        &key,
        &session,
        attachment,
        Duration::from_secs(u64::from(expiry)),
    );
    shared.count_sessions();
    shared.sessions.release(&client_id, claim.generation);
    drop(claim.done);
}

/// QoS 1/2 messages in flight to a 3.1.1 client (MQTT 5 clients say theirs).
const V311_WINDOW: u16 = 100;

fn connack(
    conn: &mut client::Conn,
    session_present: bool,
    assigned: Option<String>,
    server_keep_alive: Option<u16>,
) {
    let ack = ConnAck {
        session_present,
        code: ConnectReturnCode::Success,
    };
    let props = (conn.version == Version::V5).then(|| ConnAckProperties {
        assigned_client_identifier: assigned,
        topic_alias_max: Some(4096),
        max_packet_size: Some(
            u32::try_from(conn.shared.config.max_payload.0 + 5).unwrap_or(u32::MAX),
        ),
        retain_available: Some(1),
        wildcard_subscription_available: Some(1),
        shared_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        server_keep_alive,
        ..ConnAckProperties::default()
    });
    if let Err(End::Protocol(e)) = conn.encode(Packet::ConnAck(ack, props)) {
        warn!(error = %e, "cannot encode CONNACK");
    }
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

/// Who a client is, once its credentials are checked.
struct Identity {
    /// The username (a token's subject); none: anonymous.
    user: Option<String>,
    /// What its token grants beyond the configured ACL.
    grants: Arc<[crate::acl::AclRule]>,
    /// When its token expires, and the connection with it.
    expires: Option<std::time::SystemTime>,
}

fn authenticate(
    shared: &Shared,
    peer: SocketAddr,
    login: Option<&protocol::Login>,
    certified: Option<String>,
) -> Result<Identity, (Refusal, String)> {
    use crate::config::Anonymous;
    let login_of = |user: Option<String>| Identity {
        user,
        grants: Arc::from([]),
        expires: None,
    };
    // A client certificate the TLS handshake verified is the login.
    if let Some(user) = certified {
        return Ok(login_of(Some(user)));
    }
    match (login, &shared.tokens, &shared.passwords) {
        (Some(l), Some(tokens), _) if crate::token::looks_like_jwt(l.password.as_bytes()) => {
            let token = tokens
                .verify(&l.password)
                .map_err(|why| (Refusal::BadCredentials, why))?;
            if !l.username.is_empty() && l.username != token.subject {
                return Err((
                    Refusal::BadCredentials,
                    format!(
                        "the username is not the token's subject `{}`",
                        clip(&token.subject)
                    ),
                ));
            }
            Ok(Identity {
                user: Some(token.subject),
                grants: token.grants.into(),
                expires: Some(token.expires),
            })
        }
        (Some(l), _, Some(file)) => {
            if file.verify(&l.username, l.password.as_bytes()) {
                Ok(login_of(Some(l.username.clone())))
            } else {
                Err((Refusal::BadCredentials, "wrong username or password".into()))
            }
        }
        (Some(_), Some(_), None) => Err((
            Refusal::BadCredentials,
            "the password is not a token, and there is no password file".into(),
        )),
        // Without a password file a username proves nothing: the client is anonymous.
        _ => {
            let loopback = peer.ip().to_canonical().is_loopback();
            match shared.config.auth.anonymous {
                Anonymous::Allow => Ok(login_of(None)),
                Anonymous::Loopback if loopback => Ok(login_of(None)),
                _ => Err((
                    Refusal::NotAuthorized,
                    "anonymous clients are not allowed (auth.anonymous)".into(),
                )),
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
}
