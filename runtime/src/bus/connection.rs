//! The connection task: the event loop, reconnects with backoff, CONNACK handling, and
//! the dispatch of incoming messages to subscriptions.

use super::*;

fn jitter(d: Duration) -> Duration {
    // ±25 %.
    let f = 0.75 + (random_u64() % 1000) as f64 / 2000.0;
    d.mul_f64(f)
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectFailure {
    /// Nothing answered at the address (refused, unreachable, a name that does not resolve).
    #[error("cannot reach the broker: {0}")]
    Unreachable(String),
    /// The broker answered and refused the CONNECT (credentials, authorization, limits).
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    /// Neither a CONNACK nor a failure within the time given.
    #[error("no answer from the broker within {}", humantime::format_duration(*.0))]
    NoAnswer(Duration),
    /// The bus was closed.
    #[error("the bus was closed")]
    Closed,
}

impl ConnectFailure {
    fn of(e: &ConnectionError) -> ConnectFailure {
        match e {
            ConnectionError::ConnectionRefused(code) => ConnectFailure::Refused(refusal(code)),
            other => ConnectFailure::Unreachable(describe(other)),
        }
    }
}

/// A CONNACK reason in words: `BadUserNamePassword` → "bad user name or password".
fn refusal(code: &rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> String {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword => "bad user name or password".into(),
        C::NotAuthorized => "not authorized".into(),
        C::QuotaExceeded => "quota exceeded (too many connections)".into(),
        other => {
            let name = format!("{other:?}");
            let mut words = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    words.push(' ');
                }
                words.extend(c.to_lowercase());
            }
            words
        }
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("{io}"),
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {}", refusal(code))
        }
        ConnectionError::Timeout(_) => "connect timed out".into(),
        other => other.to_string(),
    }
}

/// The connection task: polls the event loop, reconnects with backoff, dispatches messages.
pub(super) async fn drive(weak: std::sync::Weak<Inner>, mut el: EventLoop) {
    let shutdown = match weak.upgrade() {
        Some(inner) => inner.shutdown.clone(),
        None => return,
    };
    let mut backoff: Option<Duration> = None;
    let mut requeue: VecDeque<Publish> = VecDeque::new();
    let mut down_since: Option<Instant> = None;
    let mut failures: u32 = 0;
    let mut up_since: Option<Instant> = None;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = el.poll() => ev,
        };
        let Some(inner) = weak.upgrade() else { return };
        // The next turn comes with the next packet, or the keep-alive ping at the latest (a
        // ping unanswered fails the connection one keep-alive later).
        inner.expect_turn_within(inner.options.keep_alive.max(Duration::from_secs(5)) * 2);
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                up_since = Some(Instant::now());
                inner.failure.send_replace(None);
                inner.counters.connects.fetch_add(1, Ordering::Relaxed);
                let ids = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.subscription_identifiers_available)
                    != Some(0);
                inner.sub_ids.store(ids, Ordering::Relaxed);
                // Subscriptions first (one SUBSCRIBE per filter, as each carries its
                // identifier), then what the last connection left unsent.
                let subs = read(&inner.subs).clone();
                let mut pending: VecDeque<Request> = VecDeque::new();
                let mut seen = std::collections::HashSet::new();
                for s in subs.iter().filter(|s| seen.insert(s.filter.clone())) {
                    let props = SubscribeProperties {
                        id: ids.then_some(s.sid),
                        user_properties: Vec::new(),
                    };
                    pending.push_back(Request::Subscribe(Subscribe::new(
                        Filter::new(s.filter.clone(), s.qos),
                        Some(props),
                    )));
                }
                let n = requeue.len() as u64;
                inner.counters.republished.fetch_add(n, Ordering::Relaxed);
                pending.extend(requeue.drain(..).map(|mut p| {
                    p.pkid = 0;
                    p.dup = false;
                    Request::Publish(p)
                }));
                // Whatever rumqttc kept (only on a resumed session; we always start clean).
                pending.extend(el.pending.drain(..));
                el.pending = pending;
                match down_since.take() {
                    Some(t) => tracing::info!(
                        broker = %inner.options.broker,
                        after_ms = t.elapsed().as_millis() as u64,
                        republished = n,
                        session_present = ack.session_present,
                        "reconnected"
                    ),
                    None => tracing::debug!(broker = %inner.options.broker, "connected"),
                }
                let hooks = {
                    let hooks = lock(&inner.hooks);
                    inner.connected.send_replace(true);
                    hooks.clone()
                };
                let bus = Bus {
                    inner: inner.clone(),
                };
                for h in &hooks {
                    h(&bus);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => dispatch(&inner, p),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                for code in &ack.return_codes {
                    if !matches!(code, SubscribeReasonCode::Success(_)) {
                        inner
                            .counters
                            .subscribe_refused
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!(reason = ?code, "the broker refused a subscription");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(reason = ?d.reason_code, "the broker closed the connection");
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if inner.closing.load(Ordering::Relaxed) {
                    inner.connected.send_replace(false);
                    drop(inner);
                    // Keep polling until the broker closes the connection, so the DISCONNECT
                    // is surely flushed (else the broker publishes the Last Will).
                    let drain = async { while el.poll().await.is_ok() {} };
                    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if inner.closing.load(Ordering::Relaxed) {
                    inner.connected.send_replace(false);
                    return;
                }
                // Take what rumqttc would discard on the next clean CONNACK.
                for req in el.pending.drain(..) {
                    if let Request::Publish(p) = req {
                        requeue.push_back(p);
                    }
                }
                let limit = inner.options.requeue_limit;
                while requeue.len() > limit {
                    requeue.pop_front();
                    inner
                        .counters
                        .requeue_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                let was_up = inner.connected.send_replace(false);
                inner.failure.send_replace(Some(ConnectFailure::of(&e)));
                failures += 1;
                if was_up {
                    down_since = Some(Instant::now());
                    tracing::warn!(broker = %inner.options.broker, error = %describe(&e), queued = requeue.len(), "connection lost; reconnecting");
                } else if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(broker = %inner.options.broker, error = %describe(&e), attempts = failures, "cannot connect; retrying");
                }
                let opts = &inner.options;
                // A connection that held for a while starts the backoff over; one the broker
                // drops straight after CONNACK keeps backing off.
                if up_since
                    .take()
                    .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                {
                    backoff = None;
                }
                let delay = match backoff {
                    None => opts.backoff_min,
                    Some(d) => (d * 2).min(opts.backoff_max),
                };
                backoff = Some(delay);
                // Then a connection attempt, bounded by the 5 s connection timeout.
                inner.expect_turn_within(delay + delay / 4 + Duration::from_secs(5));
                drop(inner);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(jitter(delay)) => {}
                }
            }
        }
    }
}

impl Inner {
    /// Records that the event loop will turn again within `within` (plus a margin).
    pub(super) fn expect_turn_within(&self, within: Duration) {
        let due = self.epoch.elapsed() + within + Duration::from_secs(5);
        self.loop_due
            .store(due.as_millis() as u64, Ordering::Relaxed);
    }
}

fn dispatch(inner: &Arc<Inner>, p: Publish) {
    inner.counters.received.fetch_add(1, Ordering::Relaxed);
    let Ok(topic) = std::str::from_utf8(&p.topic) else {
        tracing::warn!("message with a non-UTF-8 topic ignored");
        return;
    };
    let subs = read(&inner.subs);
    let msg = Message {
        topic: topic.to_owned(),
        payload: p.payload,
        qos: qos_num(p.qos),
        retain: p.retain,
        properties: p.properties,
        received: Instant::now(),
    };
    // With subscription identifiers, each copy the broker sends goes to the subscriptions it
    // was sent for; without them (MQTT 3.1.1 brokers, or identifiers off), by topic.
    let ids = msg
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.as_slice())
        .filter(|ids| !ids.is_empty());
    let mut closed = Vec::new();
    let targets = subs.iter().filter(|s| match ids {
        Some(ids) => ids.contains(&s.sid),
        None => matches(&s.matcher, topic),
    });
    for s in targets {
        match s.tx.try_send(msg.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => match &s.overflow {
                Some(f) => f(m),
                None => {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
                    inner
                        .counters
                        .dropped_incoming
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(filter = %s.matcher, "subscriber too slow; message dropped");
                }
            },
            Err(mpsc::error::TrySendError::Closed(_)) => closed.push(s.id),
        }
    }
    drop(subs);
    if !closed.is_empty() {
        forget(inner, &closed);
    }
}

/// Removes subscriptions whose receivers are gone, unsubscribing filters no one else uses.
pub(super) fn forget(inner: &Arc<Inner>, ids: &[u64]) {
    let mut subs = write(&inner.subs);
    let gone: Vec<Arc<Subscription>> = subs
        .iter()
        .filter(|s| ids.contains(&s.id))
        .cloned()
        .collect();
    subs.retain(|s| !ids.contains(&s.id));
    for g in gone {
        if !subs.iter().any(|s| s.filter == g.filter) {
            let _ = inner.client.try_unsubscribe(g.filter.clone());
        }
    }
}
