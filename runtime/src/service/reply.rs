//! Where a reply goes, and the one way replies and dead letters are built and sent.

use super::*;

/// The body of a dead letter: the original topic and payload (base64 when not UTF-8, and cut
/// to 64 KiB), the error, and when.
pub fn dead_letter_body(
    service: &str,
    instance: &str,
    topic: &str,
    payload: &[u8],
    error: &ErrorBody,
) -> DeadLetter {
    let cut = &payload[..payload.len().min(DeadLetter::KEEP)];
    let (text, base64) = match std::str::from_utf8(cut) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(cut)),
        ),
    };
    DeadLetter {
        service: service.to_owned(),
        instance: instance.to_owned(),
        topic: topic.to_owned(),
        payload: text,
        payload_base64: base64,
        payload_bytes: payload.len(),
        truncated: payload.len() > DeadLetter::KEEP,
        error: error.clone(),
        time: timestamp(),
    }
}

/// Where the reply to a request goes, read from the request as the contract says (response
/// topic with correlation data, `reply_to`, or `{base}/result|error`). It can be kept (it is
/// serializable) and used later: the orchestrator answers a saga request after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplyAddress {
    /// The reply topic; `None`: `{base}/result` or `{base}/error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The request topic without `/request`, for `{base}/result|error`.
    pub base: String,
    /// MQTT 5 correlation data, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<String>,
    /// The JSON `correlation_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The JSON `session_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// QoS of the reply.
    pub qos: u8,
}

impl ReplyAddress {
    /// The address of `msg`, given its metadata (already taken out of the payload).
    pub fn of(msg: &Message, meta: &RequestMeta) -> ReplyAddress {
        let topic = match (msg.response_topic(), &meta.reply_to) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(t)) if check_topic(t).is_ok() && !t.starts_with('$') => Some(t.clone()),
            _ => None,
        };
        ReplyAddress {
            topic,
            base: msg
                .topic
                .strip_suffix("/request")
                .unwrap_or(&msg.topic)
                .to_owned(),
            correlation_data: msg
                .correlation_data()
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
            correlation_id: meta.correlation_id.clone(),
            session_id: meta.session_id.clone(),
            qos: msg.qos.min(1),
        }
    }

    /// Publishes the reply: `data` in the body either way, `error` when it failed.
    pub fn reply(
        &self,
        bus: &Bus,
        service: Option<&str>,
        instance: &str,
        data: Option<Value>,
        error: Option<ErrorBody>,
    ) -> Result<(), BusError> {
        let correlation_data = self.correlation_data.as_ref().and_then(|c| {
            base64::engine::general_purpose::STANDARD
                .decode(c)
                .ok()
                .map(Bytes::from)
        });
        let request_id = match (&correlation_data, &self.correlation_id, &self.session_id) {
            (Some(c), _, _) => String::from_utf8_lossy(c).into_owned(),
            (None, Some(c), _) | (None, None, Some(c)) => c.clone(),
            _ => format!("{:016x}", random_u64()),
        };
        let success = error.is_none();
        let topic = match &self.topic {
            Some(t) => t.clone(),
            None if success => format!("{}/result", self.base),
            None => format!("{}/error", self.base),
        };
        let status = error
            .as_ref()
            .map_or_else(|| "ok".to_owned(), |e| e.code.clone());
        let body = ReplyBody {
            success,
            data,
            error,
            request_id,
            correlation_id: self.correlation_id.clone(),
            session_id: self.session_id.clone(),
            service: service.map(str::to_owned),
            instance: Some(instance.to_owned()),
            timestamp: timestamp(),
        };
        let payload = serde_json::to_vec(&body).map_err(|e| BusError::Encode(e.to_string()))?;
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            correlation_data,
            user_properties: vec![("status".into(), status)],
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        bus.try_publish(
            &topic,
            payload,
            PublishOptions {
                qos: self.qos,
                retain: false,
                properties: Some(properties),
            },
        )
    }
}

/// Answers a request message with `error`, routed as the contract says (response topic with
/// correlation data, `reply_to`, or `{base}/error`), without waiting. For parts of the bus
/// that answer for others, such as discovery's `NO_RESPONDERS`.
pub fn reply_error(
    bus: &Bus,
    msg: &Message,
    instance: &str,
    error: ErrorBody,
) -> Result<(), BusError> {
    let mut data: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
    let meta = RequestMeta::take(&mut data).unwrap_or_default();
    ReplyAddress::of(msg, &meta).reply(bus, None, instance, None, Some(error))
}
