//! The client side of request/response: one reply subscription per bus, correlation by
//! MQTT 5 correlation data, a timeout on every request, and typed errors.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bus::{Bus, BusError, PublishOptions};
use crate::wire::{code, now_ms, ErrorBody, ReplyBody};

/// How a request is sent.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// How long to wait for the reply; also sent as the request's deadline.
    pub timeout: Duration,
    /// QoS of the request.
    pub qos: u8,
    /// Extra MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            timeout: Duration::from_secs(5),
            qos: 1,
            user_properties: Vec::new(),
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
            RequestError::Bus(BusError::TooLarge { .. }) => code::PAYLOAD_TOO_LARGE,
            RequestError::Bus(BusError::InvalidTopic(..)) => code::BAD_REQUEST,
            RequestError::Bus(_) => code::SERVICE_UNAVAILABLE,
            RequestError::BadReply(_) | RequestError::NoReplyTopic => code::INTERNAL_ERROR,
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
        if target.ends_with("/request") {
            target.to_owned()
        } else {
            format!("{}/{}/request", self.prefix(), target.trim_matches('/'))
        }
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
        let body =
            serde_json::to_vec(payload).map_err(|e| RequestError::BadReply(e.to_string()))?;
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
    pub async fn request_reply(
        &self,
        topic: &str,
        payload: Bytes,
        options: &RequestOptions,
    ) -> Result<ReplyBody, RequestError> {
        let (guard, rx) = self.expect_reply().ok_or(RequestError::NoReplyTopic)?;
        let started = Instant::now();
        let mut user_properties = options.user_properties.clone();
        user_properties.push((
            "deadline_ms".into(),
            (now_ms() + options.timeout.as_millis() as u64).to_string(),
        ));
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            // Whole seconds, rounded up: the broker drops the request once it is stale.
            message_expiry_interval: Some(options.timeout.as_secs_f64().ceil().max(1.0) as u32),
            response_topic: self.options().reply_topic.clone(),
            correlation_data: Some(Bytes::from(guard.id.clone())),
            user_properties,
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        let send = self.publish(
            topic,
            payload,
            PublishOptions {
                qos: options.qos,
                retain: false,
                properties: Some(properties),
            },
        );
        match tokio::time::timeout(options.timeout, send).await {
            Ok(r) => r?,
            Err(_) => return Err(RequestError::Timeout(options.timeout)),
        }
        let left = options.timeout.saturating_sub(started.elapsed());
        let msg = match tokio::time::timeout(left, rx).await {
            Ok(Ok(msg)) => msg,
            Ok(Err(_)) => return Err(RequestError::Bus(BusError::Closed)),
            Err(_) => return Err(RequestError::Timeout(options.timeout)),
        };
        drop(guard);
        serde_json::from_slice(&msg.payload).map_err(|e| RequestError::BadReply(format!("{e}")))
    }
}
