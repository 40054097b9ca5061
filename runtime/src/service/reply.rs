//! The one reply path: where a reply goes ([`ReplyAddress`]), how it is built and sent, and
//! dead letters. Endpoints, the overflow of a saturated endpoint, discovery's
//! `NO_RESPONDERS` and the orchestrator all answer through it.

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

/// Where the reply to a request goes, as the contract says: the MQTT 5 response topic with
/// its correlation data, else the JSON `reply_to`, else `{base}/result` or `{base}/error`.
/// It can be kept (it is serializable) and used later: the orchestrator answers a saga
/// request after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplyAddress {
    /// The reply topic; `None`: `{base}/result` or `{base}/error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The request topic without `/request`, for `{base}/result|error`.
    pub base: String,
    /// MQTT 5 correlation data (base64 when serialized).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "base64_bytes"
    )]
    pub correlation_data: Option<Bytes>,
    /// The JSON `correlation_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The JSON `session_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The reply's `request_id`: the correlation data (UTF-8, else base64), else
    /// `correlation_id`, else `session_id`, else made up. Logs name the request by it.
    #[serde(default)]
    pub request_id: String,
    /// QoS of the reply.
    pub qos: u8,
}

impl ReplyAddress {
    /// The address as far as the MQTT 5 properties say (nothing of the payload is read):
    /// response topic and correlation data. The reply's QoS is the request's, at most
    /// `max_qos`.
    pub fn from_properties(msg: &Message, max_qos: u8) -> ReplyAddress {
        let correlation_data = msg.correlation_data().cloned();
        let request_id = match &correlation_data {
            Some(c) => match std::str::from_utf8(c) {
                Ok(s) => s.to_owned(),
                Err(_) => base64::engine::general_purpose::STANDARD.encode(c),
            },
            None => format!("{:016x}", random_u64()),
        };
        ReplyAddress {
            topic: msg.response_topic().map(str::to_owned),
            base: msg
                .topic
                .strip_suffix("/request")
                .unwrap_or(&msg.topic)
                .to_owned(),
            correlation_data,
            correlation_id: None,
            session_id: None,
            request_id,
            qos: msg.qos.min(max_qos),
        }
    }

    /// Completes the address with the request's JSON metadata: `reply_to` (when there is no
    /// response topic), `correlation_id` and `session_id`. A `reply_to` that is not a topic
    /// name is refused, and the error then goes to `{base}/error`.
    pub fn apply(&mut self, meta: &RequestMeta) -> Result<(), ErrorBody> {
        self.correlation_id = meta.correlation_id.clone();
        self.session_id = meta.session_id.clone();
        if self.correlation_data.is_none() {
            if let Some(c) = meta.correlation_id.as_ref().or(meta.session_id.as_ref()) {
                self.request_id = c.clone();
            }
        }
        if self.topic.is_none() {
            if let Some(to) = &meta.reply_to {
                match check_topic(to) {
                    Ok(()) if !to.starts_with('$') => self.topic = Some(to.clone()),
                    _ => {
                        return Err(ErrorBody::bad_request(format!(
                            "field `reply_to`: `{to}` is not a topic name"
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// The address of `msg`, given its metadata (already taken out of the payload). An
    /// invalid `reply_to` is left out: the reply goes to `{base}/result|error`.
    pub fn of(msg: &Message, meta: &RequestMeta) -> ReplyAddress {
        let mut address = ReplyAddress::from_properties(msg, 1);
        let _ = address.apply(meta);
        address
    }

    /// The address of `msg`, its metadata read from its payload (for answering a request
    /// without serving it: a saturated endpoint, `NO_RESPONDERS`).
    pub fn of_request(msg: &Message) -> ReplyAddress {
        let meta = decode_request(&msg.payload)
            .map(|(_, meta)| meta)
            .unwrap_or_default();
        ReplyAddress::of(msg, &meta)
    }

    /// The reply as it goes out: topic, payload and options. `data` is in the body either
    /// way, `error` when it failed. A body larger than `max_payload` is replaced by a
    /// `PAYLOAD_TOO_LARGE` error.
    pub fn encode(
        &self,
        service: Option<&str>,
        instance: &str,
        data: Option<Value>,
        error: Option<ErrorBody>,
        max_payload: usize,
    ) -> (String, Bytes, PublishOptions) {
        let success = error.is_none();
        let mut status = error
            .as_ref()
            .map_or_else(|| "ok".to_owned(), |e| e.code.clone());
        let mut topic = self.topic_for(success);
        let request_id = if self.request_id.is_empty() {
            format!("{:016x}", random_u64())
        } else {
            self.request_id.clone()
        };
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
        let mut payload = serde_json::to_vec(&body).unwrap_or_default();
        if payload.len() + topic.len() + crate::bus::PACKET_OVERHEAD > max_payload {
            let body = ReplyBody {
                success: false,
                data: None,
                error: Some(ErrorBody::new(
                    code::PAYLOAD_TOO_LARGE,
                    format!(
                        "reply of {} bytes exceeds the limit of {max_payload} bytes",
                        payload.len()
                    ),
                )),
                ..body
            };
            payload = serde_json::to_vec(&body).unwrap_or_default();
            status = code::PAYLOAD_TOO_LARGE.to_owned();
            topic = self.topic_for(false);
        }
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            correlation_data: self.correlation_data.clone(),
            user_properties: vec![(edgebus_proto::wire::STATUS.into(), status)],
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        let opts = PublishOptions {
            qos: self.qos,
            retain: false,
            properties: Some(properties),
        };
        (topic, Bytes::from(payload), opts)
    }

    /// The reply topic, or `{base}/result` or `{base}/error` when the request named none.
    fn topic_for(&self, success: bool) -> String {
        match &self.topic {
            Some(t) => t.clone(),
            None => edgebus_proto::tree::reply_under(&self.base, success),
        }
    }

    /// Publishes the reply without waiting (see [`ReplyAddress::encode`]).
    pub fn reply(
        &self,
        bus: &Bus,
        service: Option<&str>,
        instance: &str,
        data: Option<Value>,
        error: Option<ErrorBody>,
    ) -> Result<(), BusError> {
        let max = bus.options().max_payload;
        let (topic, payload, opts) = self.encode(service, instance, data, error, max);
        bus.try_publish(&topic, payload, opts)
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
    ReplyAddress::of_request(msg).reply(bus, None, instance, None, Some(error))
}

/// `Option<Bytes>` as an optional base64 string.
mod base64_bytes {
    use base64::Engine;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .map(Bytes::from)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(payload: &str, correlation: Option<&[u8]>, response: Option<&str>) -> Message {
        let properties = PublishProperties {
            correlation_data: correlation.map(Bytes::copy_from_slice),
            response_topic: response.map(str::to_owned),
            ..Default::default()
        };
        Message {
            topic: "edge/kv/put/request".into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: 1,
            retain: false,
            properties: Some(properties),
            received: Instant::now(),
        }
    }

    #[test]
    fn non_utf8_correlation_data_is_named_in_base64_everywhere() {
        let msg = request("{}", Some(&[0xff, 0x00]), Some("r/1"));
        let a = ReplyAddress::of_request(&msg);
        assert_eq!(a.request_id, "/wA=");
        let (topic, payload, opts) = a.encode(None, "i", None, None, 1 << 20);
        assert_eq!(topic, "r/1");
        let body: ReplyBody = serde_json::from_slice(&payload).unwrap();
        assert_eq!(body.request_id, "/wA=");
        let props = opts.properties.unwrap();
        assert_eq!(props.correlation_data.as_deref(), Some(&[0xff, 0x00][..]));
        // Kept and read back, as the orchestrator's journal does.
        let kept: ReplyAddress = serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        assert_eq!(kept, a);
    }

    #[test]
    fn an_invalid_reply_to_is_refused_and_the_error_goes_to_the_error_topic() {
        let msg = request(r#"{"reply_to":"a/+/b","correlation_id":"c1"}"#, None, None);
        let (_, meta) = decode_request(&msg.payload).unwrap();
        let mut a = ReplyAddress::from_properties(&msg, 1);
        let e = a.apply(&meta).unwrap_err();
        assert_eq!(e.code, code::BAD_REQUEST);
        assert_eq!(a.request_id, "c1");
        let (topic, _, _) = a.encode(None, "i", None, Some(e), 1 << 20);
        assert_eq!(topic, "edge/kv/put/error");
        // Answering for another part does the same.
        let b = ReplyAddress::of_request(&msg);
        assert_eq!(b.topic, None);
        assert_eq!(b.correlation_id.as_deref(), Some("c1"));
    }

    #[test]
    fn an_empty_payload_is_answered_like_an_empty_object() {
        let msg = request("", None, None);
        let a = ReplyAddress::of_request(&msg);
        let (topic, payload, _) = a.encode(Some("kv"), "i", Some(Value::Null), None, 1 << 20);
        assert_eq!(topic, "edge/kv/put/result");
        let body: ReplyBody = serde_json::from_slice(&payload).unwrap();
        assert!(body.success);
    }

    #[test]
    fn a_reply_too_large_becomes_payload_too_large() {
        let msg = request("{}", None, Some("r/1"));
        let a = ReplyAddress::of_request(&msg);
        let big = Value::String("x".repeat(4096));
        let (_, payload, opts) = a.encode(None, "i", Some(big), None, 2048);
        let body: ReplyBody = serde_json::from_slice(&payload).unwrap();
        assert_eq!(body.error.unwrap().code, code::PAYLOAD_TOO_LARGE);
        // The status property says what the body says.
        let status = &opts.properties.unwrap().user_properties[0].1;
        assert_eq!(status, code::PAYLOAD_TOO_LARGE);
    }
}
