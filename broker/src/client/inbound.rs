//! What a connected client sends: PUBLISH (checked, rate-limited, authorized, and routed into
//! its subscribers' queues in this task), SUBSCRIBE and UNSUBSCRIBE.

use std::sync::Arc;

use rumqttd::protocol::{
    self, Packet, PubAck, PubAckReason, PubRec, PubRecReason, PublishProperties, SubAck,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use tracing::warn;

use super::Conn;
use crate::peer::{clip, End, Version};
use crate::router::message::Message;
use crate::router::session::{Full, Queued, SubOptions};
use crate::router::Filter;
use crate::stats::bump;
use crate::strict;
use edgebus_proto::wire;

impl Conn {
    pub(super) fn on_publish(
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
            self.answer_refused_request(&t, props.as_ref());
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
        let mut seq = None;
        if qos == 2 {
            let (first, recorded) = self.session.incoming_qos2(pkid);
            if !first {
                return match ack {
                    Some(a) => self.ack(a, None),
                    None => Ok(()),
                };
            }
            seq = recorded;
        }
        bump(&self.shared.stats.messages_in);
        let request = wire::is_request_topic(topic_str);
        let props = self.vouch(props, request);
        let msg = Arc::new(Message::new(
            topic,
            publish.payload,
            qos,
            publish.retain,
            props,
            self.session.id(),
            std::time::Instant::now(),
        ));
        let seq = self.shared.route(&msg, &mut self.pending).max(seq);
        self.pending_ack = ack.map(|a| (a, seq));
        self.try_route()
    }

    /// A delivery of the PUBLISH being routed was recorded as `seq`: its acknowledgement
    /// waits for that too.
    pub(super) fn recorded(&mut self, seq: Option<u64>) {
        if let (Some((_, want)), Some(seq)) = (self.pending_ack.as_mut(), seq) {
            *want = Some(want.map_or(seq, |w| w.max(seq)));
        }
    }

    /// Who published, as this broker knows it: a request (`…/request`) gets the client's
    /// authenticated user and client id as user properties ([`wire::VERIFIED_USER`],
    /// [`wire::VERIFIED_CLIENT_ID`]), so its handler can tell who called; properties of those
    /// names a client sent are removed from every PUBLISH, so no one can claim to be someone
    /// else.
    fn vouch(&self, props: Option<PublishProperties>, request: bool) -> Option<PublishProperties> {
        let forged =
            |(k, _): &(String, String)| k == wire::VERIFIED_USER || k == wire::VERIFIED_CLIENT_ID;
        let has_forged = props
            .as_ref()
            .is_some_and(|p| p.user_properties.iter().any(forged));
        if !request && !has_forged {
            return props;
        }
        let mut p = props.unwrap_or_else(super::outbound::empty_props);
        if has_forged {
            p.user_properties.retain(|kv| !forged(kv));
        }
        if request {
            if let Some(user) = &self.user {
                p.user_properties
                    .push((wire::VERIFIED_USER.into(), user.clone()));
            }
            p.user_properties
                .push((wire::VERIFIED_CLIENT_ID.into(), self.client_id.clone()));
        }
        Some(p)
    }

    /// Queues what fits of the PUBLISH being routed without waiting; acknowledges it once
    /// every delivery is queued. What does not fit is left for `route_pending`.
    fn try_route(&mut self) -> Result<(), End> {
        while let Some((target, q)) = self.pending.pop_front() {
            match target.push(q) {
                Ok(seq) => self.recorded(seq),
                Err(Full::Queue(q)) => {
                    self.pending.push_front((target, q));
                    return Ok(());
                }
            }
        }
        match self.pending_ack.take() {
            Some((ack, seq)) => self.ack(ack, seq),
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

    /// A request the ACL refused is answered at once, as a service would answer it: an error
    /// reply on its MQTT 5 Response Topic, with its Correlation Data and the user property
    /// `status`, so the caller learns why now rather than at its timeout. The code is
    /// `UNAUTHORIZED` for an anonymous client ("log in") and `FORBIDDEN` for a known one
    /// ("you may not"). Nothing is sent to a Response Topic the client may not read itself.
    fn answer_refused_request(&self, topic: &str, props: Option<&PublishProperties>) {
        let Some(reply_to) = props.and_then(|p| p.response_topic.as_deref()) else {
            return;
        };
        if !wire::is_request_topic(topic)
            || crate::acl::check_topic(reply_to).is_err()
            || reply_to.starts_with('$')
            || !self.shared.config.acl.can_read(self.principal(), reply_to)
        {
            return;
        }
        let (code, message) = match self.user.as_deref() {
            None => (
                wire::code::UNAUTHORIZED,
                format!("the broker refused this request to {topic}: log in (anonymous clients may not send it)"),
            ),
            Some(user) => (
                wire::code::FORBIDDEN,
                format!("the broker refused this request to {topic}: user `{user}` has no permission for it"),
            ),
        };
        let correlation = props.and_then(|p| p.correlation_data.clone());
        let body = wire::ReplyBody {
            success: false,
            data: None,
            error: Some(wire::ErrorBody::new(code, message)),
            request_id: correlation
                .as_ref()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .unwrap_or_default(),
            correlation_id: None,
            session_id: None,
            service: None,
            instance: None,
            timestamp: wire::timestamp(),
        };
        let Ok(payload) = serde_json::to_vec(&body) else {
            return;
        };
        let mut reply = super::outbound::empty_props();
        reply.correlation_data = correlation;
        reply.payload_format_indicator = Some(1);
        reply.content_type = Some("application/json".into());
        reply.user_properties = vec![(wire::STATUS.into(), code.into())];
        self.shared.publish(
            bytes::Bytes::copy_from_slice(reply_to.as_bytes()),
            payload.into(),
            1,
            false,
            Some(reply),
        );
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

    pub(super) fn on_subscribe(
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
        // The SUBACK of a persistent session's subscriptions waits for their record.
        let mut recorded = None;
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
            let (existed, seq) = self.shared.router.subscribe(&self.session, filter, options);
            recorded = recorded.max(seq);
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
                    let qos = m.qos.min(granted);
                    let mut q = Queued::new(m, qos, true, None);
                    q.sub_ids = id.into_iter().collect();
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
        self.ack(
            Packet::SubAck(
                SubAck {
                    pkid: sub.pkid,
                    return_codes: codes,
                },
                None,
            ),
            recorded,
        )
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

    pub(super) fn on_unsubscribe(&mut self, unsub: protocol::Unsubscribe) -> Result<(), End> {
        let mut recorded = None;
        let reasons = unsub
            .filters
            .iter()
            .map(|full| {
                let Some(f) = Filter::parse(full) else {
                    return UnsubAckReason::NoSubscriptionExisted;
                };
                let (existed, seq) = self.shared.router.unsubscribe(&self.session, f);
                recorded = recorded.max(seq);
                if existed {
                    UnsubAckReason::Success
                } else {
                    UnsubAckReason::NoSubscriptionExisted
                }
            })
            .collect();
        self.shared.stats.filters.store(
            self.shared.router.subscription_count() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.ack(
            Packet::UnsubAck(
                UnsubAck {
                    pkid: unsub.pkid,
                    reasons,
                },
                None,
            ),
            recorded,
        )
    }
}
