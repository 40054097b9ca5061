//! The client side of request/response: one reply subscription per bus, correlation by
//! MQTT 5 correlation data, a timeout on every request, and typed errors.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::de::DeserializeOwned;
use serde::Serialize;

use std::sync::atomic::Ordering;

use crate::bus::{Bus, BusError, PublishOptions, TargetPolicy};
use crate::policy::{counts_as_failure, Admission, CircuitState, RetryPolicy, Transition};
use crate::wire::{code, now_ms, ErrorBody, ReplyBody};
pub use crate::wire::{CALLER, CALLER_SERVICE};

/// How a request is sent.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// How long to wait for the reply; also sent as the request's deadline.
    pub timeout: Duration,
    /// QoS of the request.
    pub qos: u8,
    /// Extra MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
    /// Whether the target's retry and circuit policy applies ([`Bus::set_policy`]); callers
    /// with their own retries (saga steps) turn it off.
    pub policy: bool,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            timeout: Duration::from_secs(5),
            qos: 1,
            user_properties: Vec::new(),
            policy: true,
        }
    }
}

impl RequestOptions {
    /// Default options with `timeout`.
    pub fn timeout(timeout: Duration) -> Self {
        RequestOptions {
            timeout,
            ..Default::default()
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The service answered with an error.
    #[error("{0}")]
    Remote(ErrorBody),
    /// No reply arrived in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The request could not be sent.
    #[error("request not sent: {0}")]
    Bus(#[from] BusError),
    /// The reply could not be read.
    #[error("unreadable reply: {0}")]
    BadReply(String),
    /// The request could not be encoded as JSON.
    #[error("the request cannot be encoded: {0}")]
    Encode(String),
    /// The target's circuit breaker is open: the request was not sent.
    #[error("circuit open for `{target}`; next trial in {retry_after:?}")]
    CircuitOpen {
        /// `service/endpoint`.
        target: String,
        /// When the circuit lets a trial request through.
        retry_after: Duration,
    },
    /// This bus was made without a reply topic.
    #[error("this bus has no reply topic (set BusOptions::reply_topic)")]
    NoReplyTopic,
}

impl RequestError {
    /// The contract's error code for this failure.
    pub fn code(&self) -> &str {
        match self {
            RequestError::Remote(e) => &e.code,
            RequestError::Timeout(_) => code::TIMEOUT,
            RequestError::CircuitOpen { .. } => code::CIRCUIT_OPEN,
            RequestError::Bus(BusError::TooLarge { .. }) => code::PAYLOAD_TOO_LARGE,
            RequestError::Bus(BusError::InvalidTopic(..)) => code::BAD_REQUEST,
            RequestError::Bus(_) => code::SERVICE_UNAVAILABLE,
            RequestError::BadReply(_) | RequestError::NoReplyTopic => code::INTERNAL_ERROR,
            RequestError::Encode(_) => code::BAD_REQUEST,
        }
    }

    /// Whether sending the same request again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            RequestError::Remote(e) => e.retryable,
            other => code::retryable(other.code()),
        }
    }

    /// The error as a reply's error body.
    pub fn to_body(&self) -> ErrorBody {
        match self {
            RequestError::Remote(e) => e.clone(),
            other => ErrorBody::new(other.code(), other.to_string()),
        }
    }
}

impl Bus {
    /// The request topic of `target`: `service/endpoint` becomes
    /// `{prefix}/service/endpoint/request`; a topic ending in `/request` is used as is.
    pub fn request_topic(&self, target: &str) -> String {
        edgebus_proto::tree::Tree::new(self.prefix()).request_for(target)
    }

    /// Sends `payload` to `target` (`service/endpoint`) and returns the reply's data.
    pub async fn request<T, R>(
        &self,
        target: &str,
        payload: &T,
        timeout: Duration,
    ) -> Result<R, RequestError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let body = serde_json::to_vec(payload).map_err(|e| RequestError::Encode(e.to_string()))?;
        let reply = self
            .request_raw(
                &self.request_topic(target),
                body.into(),
                &RequestOptions::timeout(timeout),
            )
            .await?;
        let data = reply.data.unwrap_or(serde_json::Value::Null);
        serde_json::from_value(data).map_err(|e| RequestError::BadReply(e.to_string()))
    }

    /// Sends a request to a request topic and returns the whole reply; a reply with
    /// `success: false` is [`RequestError::Remote`].
    pub async fn request_raw(
        &self,
        topic: &str,
        payload: Bytes,
        options: &RequestOptions,
    ) -> Result<ReplyBody, RequestError> {
        let reply = self.request_reply(topic, payload, options).await?;
        if reply.success {
            Ok(reply)
        } else {
            Err(RequestError::Remote(reply.error.unwrap_or_else(|| {
                ErrorBody::new(code::INTERNAL_ERROR, "error reply without an error body")
            })))
        }
    }

    /// Sends a request and returns whatever reply comes, error replies included; `Err` only
    /// when no reply could be had.
    ///
    /// When the target has a policy ([`Bus::set_policy`], or `retry` and `circuit` in
    /// topics.toml) and `options.policy` is on: an open circuit fails the request at once; a
    /// retryable error or an attempt's timeout sends the request again, with the same
    /// correlation data, until the attempts or `options.timeout` run out; a request that still
    /// fails goes to the caller's dead letters.
    pub async fn request_reply(
        &self,
        topic: &str,
        payload: Bytes,
        options: &RequestOptions,
    ) -> Result<ReplyBody, RequestError> {
        let policy = if options.policy {
            self.policy(topic)
        } else {
            None
        };
        let mut correlation = String::new();
        let Some(policy) = policy else {
            return self
                .attempts(topic, &payload, options, None, &mut correlation)
                .await;
        };
        let result = self
            .attempts(topic, &payload, options, Some(&policy), &mut correlation)
            .await;
        let failure = match &result {
            Ok(r) if !r.success => r.error.clone(),
            Ok(_) | Err(RequestError::CircuitOpen { .. }) => None,
            Err(e) => Some(e.to_body()),
        };
        if let (Some(error), Some(retry)) = (failure, &policy.retry) {
            if retry.max_attempts > 1 {
                self.dead_letter_request(topic, &payload, &error, &correlation)
                    .await;
            }
        }
        result
    }

    async fn attempts(
        &self,
        topic: &str,
        payload: &Bytes,
        options: &RequestOptions,
        policy: Option<&TargetPolicy>,
        correlation: &mut String,
    ) -> Result<ReplyBody, RequestError> {
        let (guard, mut rx) = self.expect_reply().ok_or(RequestError::NoReplyTopic)?;
        correlation.clone_from(&guard.id);
        let started = Instant::now();
        let deadline = started + options.timeout;
        let deadline_ms = now_ms() + options.timeout.as_millis() as u64;
        let single = RetryPolicy::default();
        let retry = policy.and_then(|p| p.retry.as_ref()).unwrap_or(&single);
        let per_attempt = retry.attempt_timeout(options.timeout);
        let circuit = policy.and_then(|p| p.circuit.as_ref());
        let name = policy.map_or(topic, |p| p.name.as_str());
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Some(b) = circuit {
                match b.admit() {
                    Admission::Rejected(retry_after) => {
                        self.counters()
                            .circuit_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(RequestError::CircuitOpen {
                            target: name.to_owned(),
                            retry_after,
                        });
                    }
                    Admission::Allowed(t) => log_transition(name, t),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RequestError::Timeout(options.timeout));
            }
            let wait = per_attempt.min(left);
            let outcome = match self
                .send_attempt(topic, payload, options, &guard.id, deadline_ms, left)
                .await
            {
                Err(e) => Err(e),
                Ok(()) => match tokio::time::timeout(wait, &mut rx).await {
                    Ok(Ok(msg)) => serde_json::from_slice::<ReplyBody>(&msg.payload)
                        .map_err(|e| RequestError::BadReply(format!("{e}"))),
                    Ok(Err(_)) => Err(RequestError::Bus(BusError::Closed)),
                    Err(_) => Err(RequestError::Timeout(options.timeout)),
                },
            };
            let code = match &outcome {
                Ok(r) if r.success => None,
                Ok(r) => Some(r.error.as_ref().map_or(code::INTERNAL_ERROR, |e| &e.code)),
                Err(e) => Some(e.code()),
            };
            if let Some(b) = circuit {
                log_transition(name, b.record(!code.is_some_and(counts_as_failure)));
            }
            let closed = matches!(outcome, Err(RequestError::Bus(BusError::Closed)));
            let delay = code
                .and_then(|c| retry.retry_after(attempt, c))
                .filter(|d| !closed && Instant::now() + *d < deadline);
            let Some(delay) = delay else {
                if let Some(code) = code {
                    tracing::debug!(target = name, correlation_id = %guard.id, attempts = attempt, code = %code, "request failed");
                }
                return outcome;
            };
            tracing::debug!(target = name, correlation_id = %guard.id, attempt, code = ?code, delay_ms = delay.as_millis() as u64, "retrying request");
            self.counters()
                .request_retries
                .fetch_add(1, Ordering::Relaxed);
            if outcome.is_ok() {
                // The error reply used the waiting slot; the next attempt needs a new one.
                rx = guard.rearm();
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn send_attempt(
        &self,
        topic: &str,
        payload: &Bytes,
        options: &RequestOptions,
        correlation: &str,
        deadline_ms: u64,
        left: Duration,
    ) -> Result<(), RequestError> {
        let mut user_properties = options.user_properties.clone();
        user_properties.push(("deadline_ms".into(), deadline_ms.to_string()));
        // Who is asking, as this client knows itself (see `service::Caller`).
        user_properties.push((CALLER.into(), self.client_id().to_owned()));
        if let Some(me) = &self.options().presence {
            user_properties.push((CALLER_SERVICE.into(), me.service.clone()));
        }
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            // Whole seconds, rounded up: the broker drops the request once it is stale.
            message_expiry_interval: Some(left.as_secs_f64().ceil().max(1.0) as u32),
            response_topic: self.options().reply_topic.clone(),
            correlation_data: Some(Bytes::from(correlation.to_owned())),
            user_properties,
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        let send = self.publish(
            topic,
            payload.clone(),
            PublishOptions {
                qos: options.qos,
                retain: false,
                properties: Some(properties),
            },
        );
        match tokio::time::timeout(left, send).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RequestError::Timeout(options.timeout)),
        }
    }

    /// Publishes a request that failed after its retries to this client's dead letters.
    async fn dead_letter_request(
        &self,
        topic: &str,
        payload: &[u8],
        error: &ErrorBody,
        correlation: &str,
    ) {
        let (service, instance) = match &self.options().presence {
            Some(p) => (p.service.as_str(), p.instance.as_str()),
            None => (self.client_id(), self.client_id()),
        };
        let letter = crate::service::dead_letter_body(service, instance, topic, payload, error);
        tracing::warn!(topic, correlation_id = correlation, code = %error.code, error = %error.message, "request failed after its retries; dead letter published");
        self.counters().dead_letters.fetch_add(1, Ordering::Relaxed);
        let to = edgebus_proto::tree::Tree::new(self.prefix()).dead_letter(service);
        let _ = self
            .publish_json(&to, &letter, PublishOptions::qos(1))
            .await;
    }
}

fn log_transition(target: &str, t: Option<Transition>) {
    if let Some(t) = t {
        match t.to {
            CircuitState::Open => {
                tracing::warn!(target, from = %t.from, to = %t.to, "circuit breaker opened")
            }
            _ => {
                tracing::info!(target, from = %t.from, to = %t.to, "circuit breaker state changed")
            }
        }
    }
}
