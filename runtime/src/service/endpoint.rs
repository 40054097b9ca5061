//! The serving loop of one endpoint: limits, deadlines, duplicates, the handler, one reply.

use super::*;

/// Everything a request task needs.
pub(super) struct EndpointCtx {
    pub(super) service: Arc<ServiceInner>,
    pub(super) spec: EndpointSpec,
    pub(super) request_topic: String,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) stats: Arc<EndpointStats>,
    pub(super) max_request: usize,
    pub(super) limit: Arc<Semaphore>,
    pub(super) rate: Option<Mutex<TokenBucket>>,
    pub(super) dedupe: Option<Mutex<Dedupe>>,
}

/// A reply ready to publish: topic, payload, options.
pub(super) type Encoded = Arc<(String, Bytes, PublishOptions)>;

pub(super) enum Slot {
    /// The handler runs; the sender is dropped when it finishes.
    Running(tokio::sync::watch::Receiver<()>),
    /// Its reply, to send again to a duplicate.
    Done(Encoded),
}

/// Recent requests of one endpoint by correlation, bounded in count, age and bytes.
pub(super) struct Dedupe {
    size: usize,
    ttl: Duration,
    bytes: usize,
    hasher: std::collections::hash_map::RandomState,
    slots: HashMap<u64, Slot>,
    order: VecDeque<(u64, Instant)>,
}

/// Bytes of cached replies one endpoint keeps at most.
pub(super) const DEDUPE_MAX_BYTES: usize = 4 * 1024 * 1024;

pub(super) enum Claim {
    /// A new request: run it.
    New(u64, tokio::sync::watch::Sender<()>),
    /// Already answered: send this again.
    Answered(Encoded),
    /// Running now: wait for it.
    Wait(tokio::sync::watch::Receiver<()>),
}

impl Dedupe {
    pub(super) fn new(size: usize, ttl: Duration) -> Dedupe {
        Dedupe {
            size,
            ttl,
            bytes: 0,
            hasher: Default::default(),
            slots: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn key(&self, parts: &[&[u8]]) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.hasher.build_hasher();
        for p in parts {
            h.write_usize(p.len());
            h.write(p);
        }
        h.finish()
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(key, at)) = self.order.front() {
            let old = now.saturating_duration_since(at) > self.ttl;
            if !(old || self.order.len() > self.size || self.bytes > DEDUPE_MAX_BYTES) {
                break;
            }
            self.order.pop_front();
            if let Some(Slot::Done(e)) = self.slots.remove(&key) {
                self.bytes -= e.1.len();
            }
        }
    }

    fn claim(&mut self, key: u64) -> Claim {
        let now = Instant::now();
        self.evict(now);
        match self.slots.get(&key) {
            Some(Slot::Done(e)) => Claim::Answered(e.clone()),
            // A handler whose task ended without finishing (aborted at stop) leaves a closed
            // channel: the request is new again.
            Some(Slot::Running(rx)) if rx.has_changed().is_ok() => Claim::Wait(rx.clone()),
            _ => {
                let (tx, rx) = tokio::sync::watch::channel(());
                self.slots.insert(key, Slot::Running(rx));
                self.order.push_back((key, now));
                Claim::New(key, tx)
            }
        }
    }

    /// The request ran: keep its reply, or forget it so a retry runs it again.
    fn finish(&mut self, key: u64, reply: Option<Encoded>) {
        match reply {
            Some(e) => {
                self.bytes += e.1.len();
                self.slots.insert(key, Slot::Done(e));
            }
            None => {
                self.slots.remove(&key);
                self.order.retain(|(k, _)| *k != key);
            }
        }
    }
}

/// Takes requests until `stopping`; then unsubscribes and serves what was already received.
/// Returns once every request it took has been answered.
pub(super) async fn serve(
    ctx: Arc<EndpointCtx>,
    mut sub: crate::bus::Subscriber,
    stopping: CancellationToken,
) {
    let mut running = tokio::task::JoinSet::new();
    let mut stopped = false;
    loop {
        let msg = tokio::select! {
            m = sub.recv() => m,
            _ = stopping.cancelled(), if !stopped => {
                stopped = true;
                sub.unsubscribe();
                continue;
            }
        };
        let Some(msg) = msg else { break };
        let Ok(permit) = ctx.limit.clone().acquire_owned().await else {
            break;
        };
        while running.try_join_next().is_some() {}
        let ctx = ctx.clone();
        running.spawn(async move {
            ctx.handle(msg).await;
            drop(permit);
        });
    }
    while running.join_next().await.is_some() {}
}

/// A request taken apart once: its data and metadata, or why it cannot be served.
type Decoded = Result<(Value, RequestMeta), ErrorBody>;

impl EndpointCtx {
    /// Reads the request once: its size against the limit, its JSON and metadata, its reply
    /// address.
    fn decode(&self, msg: &Message, reply: &mut ReplyAddress) -> Decoded {
        if msg.payload.len() > self.max_request {
            return Err(ErrorBody::new(
                code::PAYLOAD_TOO_LARGE,
                format!(
                    "request of {} bytes exceeds this endpoint's limit of {} bytes",
                    msg.payload.len(),
                    self.max_request
                ),
            ));
        }
        let (data, meta) = decode_request(&msg.payload).map_err(ServiceError::bad_request)?;
        reply.apply(&meta)?;
        Ok((data, meta))
    }

    async fn handle(&self, msg: Message) {
        let started = msg.received;
        let mut reply = ReplyAddress::from_properties(&msg, self.spec.qos);
        let decoded = self.decode(&msg, &mut reply);
        let mut claimed = None;
        if let Some(dedupe) = &self.dedupe {
            if let Some(correlation) = dedupe_correlation(&msg, &decoded) {
                let reply_topic = msg.response_topic().unwrap_or("").as_bytes();
                loop {
                    let claim = {
                        let mut d = lock(dedupe);
                        let key = d.key(&[reply_topic, &correlation, &msg.payload]);
                        d.claim(key)
                    };
                    match claim {
                        Claim::New(key, done) => {
                            claimed = Some((key, done));
                            break;
                        }
                        Claim::Answered(encoded) => {
                            self.stats.duplicate();
                            tracing::debug!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = %reply.request_id, "duplicate request; reply sent again");
                            self.publish_reply(&encoded, &reply.request_id).await;
                            return;
                        }
                        // Returns when the first copy's handler is done (its sender dropped).
                        Claim::Wait(mut running) => while running.changed().await.is_ok() {},
                    }
                }
            }
        }
        self.stats.start();
        let limited = self.rate.as_ref().is_some_and(|r| !lock(r).try_take(1.0));
        let result = if limited {
            self.stats.rate_limited();
            Err(ErrorBody::new(
                code::RATE_LIMITED,
                format!(
                    "endpoint `{}` admits {} requests per second per instance; retry later",
                    self.spec.name,
                    self.spec.rate_limit.map_or(0.0, |r| r.per_second)
                ),
            ))
        } else {
            match decoded {
                Ok((data, meta)) => self.run(&msg, data, meta, &reply.request_id).await,
                Err(e) => Err(e),
            }
        };
        let ok = result.is_ok();
        let cacheable = result.as_ref().map_or_else(|e| !e.retryable, |_| true);
        let letter = match &result {
            Err(e)
                if e.code == code::BAD_REQUEST
                    || e.code == code::PAYLOAD_TOO_LARGE
                    || e.code == code::INTERNAL_ERROR =>
            {
                Some(e.clone())
            }
            _ => None,
        };
        match &result {
            Err(e) => {
                tracing::debug!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = %reply.request_id, code = %e.code, error = %e.message, took_us = started.elapsed().as_micros() as u64, "request failed")
            }
            Ok(_) => {
                tracing::debug!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = %reply.request_id, took_us = started.elapsed().as_micros() as u64, "request served")
            }
        }
        let (data, error) = match result {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        let encoded = Arc::new(reply.encode(
            Some(&self.service.name),
            &self.service.instance,
            data,
            error,
            self.service.bus.options().max_payload,
        ));
        if let (Some((key, done)), Some(dedupe)) = (claimed, &self.dedupe) {
            lock(dedupe).finish(key, cacheable.then(|| encoded.clone()));
            drop(done);
        }
        // The caller waits for the reply; the dead letter is for operators, so it goes second.
        self.publish_reply(&encoded, &reply.request_id).await;
        if let Some(e) = letter {
            self.dead_letter(&msg, &e, &reply.request_id).await;
        }
        self.stats.finish(started.elapsed(), ok);
    }

    async fn run(
        &self,
        msg: &Message,
        data: Value,
        meta: RequestMeta,
        request_id: &str,
    ) -> Result<Value, ServiceError> {
        // The earliest of: MQTT 5 expiry, the runtime's `deadline_ms` user property, and
        // `deadline_ms` in the JSON.
        let now_ms = now_ms();
        let mut deadline: Option<Instant> = msg
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| msg.received + Duration::from_secs(u64::from(s)));
        let user_deadline = msg
            .user_property("deadline_ms")
            .and_then(|v| v.parse().ok());
        for ms in [user_deadline, meta.deadline_ms].into_iter().flatten() {
            let at = msg.received + Duration::from_millis(ms.saturating_sub(now_ms));
            if ms <= now_ms {
                return Err(ErrorBody::new(
                    code::TIMEOUT,
                    format!(
                        "deadline passed {} ms before the request was handled",
                        now_ms - ms
                    ),
                ));
            }
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(ErrorBody::new(
                code::TIMEOUT,
                "deadline passed before the request was handled",
            ));
        }
        if let Some(schema) = &self.spec.schema {
            schema.check(&data).map_err(ServiceError::bad_request)?;
        }
        let budget = match deadline {
            Some(d) => self
                .spec
                .timeout
                .min(d.saturating_duration_since(Instant::now())),
            None => self.spec.timeout,
        };
        let req = Request {
            data,
            topic: msg.topic.clone(),
            correlation_id: meta.correlation_id.or(meta.session_id),
            deadline,
            user_properties: msg
                .properties
                .as_ref()
                .map(|p| p.user_properties.clone())
                .unwrap_or_default(),
            bus: self.service.bus.clone(),
            events: Emitter(self.service.clone()),
        };
        let fut = AssertUnwindSafe(self.handler.call(req)).catch_unwind();
        match tokio::time::timeout(budget, fut).await {
            Err(_) => Err(ErrorBody::new(
                code::TIMEOUT,
                format!("handler did not finish within {budget:?}"),
            )),
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                tracing::error!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = %request_id, panic = %what, "handler panicked");
                Err(ServiceError::internal(format!("handler panicked: {what}")))
            }
            Ok(Ok(r)) => r,
        }
    }

    async fn publish_reply(&self, encoded: &Encoded, correlation: &str) {
        let (topic, payload, opts) = &**encoded;
        if let Err(e) = self
            .service
            .bus
            .publish(topic, payload.clone(), opts.clone())
            .await
        {
            tracing::warn!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = correlation, topic, error = %e, "reply not sent");
        }
    }

    async fn dead_letter(&self, msg: &Message, error: &ErrorBody, correlation: &str) {
        let letter = dead_letter_body(
            &self.service.name,
            &self.service.instance,
            &msg.topic,
            &msg.payload,
            error,
        );
        tracing::warn!(
            service = %self.service.name,
            endpoint = %self.spec.name,
            correlation_id = correlation,
            topic = %msg.topic,
            code = %error.code,
            error = %error.message,
            "request refused; dead letter published"
        );
        let _ = self
            .service
            .bus
            .publish_json(&self.service.deadletter, &letter, PublishOptions::qos(1))
            .await;
    }
}

/// What tells copies of one request apart: the MQTT 5 correlation data, or else the
/// `correlation_id` (or `session_id`) of the request's JSON. `None`: no correlation, so no
/// duplicate detection.
fn dedupe_correlation(msg: &Message, decoded: &Decoded) -> Option<Bytes> {
    if let Some(c) = msg.correlation_data() {
        return Some(c.clone());
    }
    let (_, meta) = decoded.as_ref().ok()?;
    let id = meta.correlation_id.as_ref().or(meta.session_id.as_ref())?;
    Some(Bytes::from(id.clone()))
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
