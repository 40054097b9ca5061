//! Subscriptions: filters with identifiers, the reply and lag subscriptions, and `sync`.

use super::*;

/// A stream of messages from one subscription.
#[derive(Debug)]
pub struct Subscriber {
    rx: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
    filter: String,
    id: u64,
    bus: std::sync::Weak<Inner>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            forget(&inner, &[self.id]);
        }
    }
}

impl Subscriber {
    /// Stops the subscription: the broker sends no more (once no other subscriber on this
    /// bus uses the same filter), and [`Subscriber::recv`] returns what is already buffered,
    /// then `None`.
    pub fn unsubscribe(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            forget(&inner, &[self.id]);
        }
        self.rx.close();
    }

    /// The next message; `None` once the bus is closed.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is buffered now.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Messages lost because this subscriber fell more than its buffer behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The filter subscribed to.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// Polls for the next message (for `Stream` implementations).
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Bus {
    /// Subscribes to `filter`. The subscription is restored after every reconnect.
    pub async fn subscribe(&self, filter: &str, qos: u8) -> Result<Subscriber, BusError> {
        self.subscribe_with(filter, filter, qos, None).await
    }

    /// Subscribes through the shared group `group`, so that each message goes to one member.
    pub async fn subscribe_shared(
        &self,
        group: &str,
        filter: &str,
        qos: u8,
    ) -> Result<Subscriber, BusError> {
        let shared = format!("$share/{group}/{filter}");
        self.subscribe_with(&shared, filter, qos, None).await
    }

    /// Subscribes with full control: `wire` is sent to the broker, `matcher` matches incoming
    /// topics, and `overflow` gets what a full buffer cannot take (instead of counting a drop).
    pub async fn subscribe_with(
        &self,
        wire: &str,
        matcher: &str,
        qos: u8,
        overflow: Option<OverflowFn>,
    ) -> Result<Subscriber, BusError> {
        if let Err(reason) = check_filter(matcher) {
            return Err(BusError::InvalidTopic(matcher.into(), reason));
        }
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(BusError::Closed);
        }
        let (sub, subscriber) = self.new_subscription(wire, matcher, qos, overflow);
        // Queued for the connection; if it is down, the next CONNACK subscribes anyway.
        let wait = self.inner.options.publish_timeout;
        let send = self.inner.client.subscribe_with_properties(
            sub.filter.clone(),
            sub.qos,
            self.sub_properties(sub.sid),
        );
        // On failure, dropping `subscriber` forgets the subscription.
        queue(wait, send).await.map(|()| subscriber)
    }

    fn sub_properties(&self, sid: usize) -> SubscribeProperties {
        SubscribeProperties {
            id: self.inner.sub_ids.load(Ordering::Relaxed).then_some(sid),
            user_properties: Vec::new(),
        }
    }

    fn new_subscription(
        &self,
        wire: &str,
        matcher: &str,
        qos: u8,
        overflow: Option<OverflowFn>,
    ) -> (Arc<Subscription>, Subscriber) {
        let (tx, rx) = mpsc::channel(self.inner.options.subscription_buffer.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let id = self.inner.next_sub.fetch_add(1, Ordering::Relaxed);
        let mut subs = write(&self.inner.subs);
        let sid = subs
            .iter()
            .find(|s| s.filter == wire)
            .map_or((id as usize - 1) % MAX_SUBSCRIPTION_ID + 1, |s| s.sid);
        let sub = Arc::new(Subscription {
            id,
            sid,
            filter: wire.to_owned(),
            matcher: matcher.to_owned(),
            qos: qos_of(qos.min(1)),
            tx,
            dropped: dropped.clone(),
            overflow,
        });
        subs.push(sub.clone());
        let subscriber = Subscriber {
            rx,
            dropped,
            filter: matcher.to_owned(),
            id,
            bus: Arc::downgrade(&self.inner),
        };
        (sub, subscriber)
    }

    pub(super) fn register_reply_subscription(&self, topic: String) -> Result<(), BusError> {
        if let Err(reason) = check_topic(&topic) {
            return Err(BusError::InvalidTopic(topic, reason));
        }
        let (_, mut subscriber) = self.new_subscription(&topic, &topic, 1, None);
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(msg) = subscriber.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                let key = msg
                    .correlation_data()
                    .map(|c| String::from_utf8_lossy(c).into_owned());
                let waiter = key.and_then(|k| lock(&inner.pending).remove(&k));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(msg);
                    }
                    None => {
                        inner.unmatched_replies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(())
    }

    pub(super) fn register_lag_subscription(&self) {
        let topic = edgebus_proto::tree::Tree::new(self.prefix()).broker_lag();
        let (_, mut subscriber) = self.new_subscription(&topic, &topic, 0, None);
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(msg) = subscriber.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                let Ok(event) = serde_json::from_slice::<LagEvent>(&msg.payload) else {
                    continue;
                };
                if event.client_id != inner.options.client_id {
                    continue;
                }
                inner
                    .counters
                    .skipped_at_broker
                    .fetch_add(event.lost, Ordering::Relaxed);
                // The broker names the filter as it keeps it: a shared one without its group.
                let wire = |f: &str| {
                    f.strip_prefix("$share/")
                        .and_then(|r| r.split_once('/'))
                        .map_or(f.to_owned(), |(_, f)| f.to_owned())
                };
                for s in read(&inner.subs).iter() {
                    if wire(&s.filter) == event.filter {
                        s.dropped.fetch_add(event.lost, Ordering::Relaxed);
                    }
                }
                tracing::warn!(
                    filter = %event.filter,
                    lost = event.lost,
                    "the broker dropped messages for this client: it fell behind"
                );
                let _ = inner.lag.send(event);
            }
        });
    }

    /// Lag reports for this client, as they come (needs [`BusOptions::watch_lag`]).
    pub fn lag_events(&self) -> tokio::sync::broadcast::Receiver<LagEvent> {
        self.inner.lag.subscribe()
    }

    /// Registers a waiter for a reply and returns its correlation id and receiver. The
    /// waiter is removed when the receiver's request finishes (see [`ReplyGuard`]).
    pub(crate) fn expect_reply(&self) -> Option<(ReplyGuard, oneshot::Receiver<Message>)> {
        self.inner.options.reply_topic.as_ref()?;
        let n = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:016x}{n:x}", self.inner.request_nonce);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id.clone(), tx);
        Some((
            ReplyGuard {
                bus: self.clone(),
                id,
            },
            rx,
        ))
    }

    /// Waits until everything this bus sent before the call has been processed by the
    /// broker: a message sent to the bus's own reply topic comes back. Subscriptions made
    /// before `sync` are active once it returns `true`.
    pub async fn sync(&self, timeout: Duration) -> bool {
        let Some((guard, rx)) = self.expect_reply() else {
            return false;
        };
        let Some(topic) = self.inner.options.reply_topic.clone() else {
            return false;
        };
        let props = PublishProperties {
            correlation_data: Some(Bytes::from(guard.id.clone())),
            ..Default::default()
        };
        let opts = PublishOptions {
            qos: 1,
            retain: false,
            properties: Some(props),
        };
        let round_trip =
            async { self.publish(&topic, Bytes::new(), opts).await.is_ok() && rx.await.is_ok() };
        tokio::time::timeout(timeout, round_trip)
            .await
            .unwrap_or(false)
    }
}
