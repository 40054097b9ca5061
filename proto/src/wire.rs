//! What request/response looks like on the wire: error codes, the reply body, and the
//! metadata a request may carry in its JSON (`reply_to`, `correlation_id`, `deadline_ms`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Error codes of the contract; services may add their own in upper snake case.
pub mod code {
    /// The request is malformed or fails the endpoint's schema.
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
    /// The caller is not known.
    pub const UNAUTHORIZED: &str = "UNAUTHORIZED";
    /// The caller may not do this.
    pub const FORBIDDEN: &str = "FORBIDDEN";
    /// No such thing.
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// The deadline passed before a reply.
    pub const TIMEOUT: &str = "TIMEOUT";
    /// No instance serves the endpoint.
    pub const NO_RESPONDERS: &str = "NO_RESPONDERS";
    /// The service cannot take the request now (overloaded, starting, stopping).
    pub const SERVICE_UNAVAILABLE: &str = "SERVICE_UNAVAILABLE";
    /// The caller's circuit breaker for the endpoint is open.
    pub const CIRCUIT_OPEN: &str = "CIRCUIT_OPEN";
    /// Too many requests.
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// The request or reply is larger than allowed.
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    /// The handler failed or panicked.
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";

    /// Whether a request that failed with `code` may be sent again as is.
    pub fn retryable(code: &str) -> bool {
        matches!(
            code,
            TIMEOUT | NO_RESPONDERS | SERVICE_UNAVAILABLE | CIRCUIT_OPEN | RATE_LIMITED
        )
    }
}

/// The MQTT 5 user property of a reply that says `ok` or the error code.
pub const STATUS: &str = "status";

/// The error part of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Upper-snake-case code, see [`code`].
    pub code: String,
    /// What went wrong, for humans.
    pub message: String,
    /// Whether the same request may be sent again.
    #[serde(default)]
    pub retryable: bool,
}

impl ErrorBody {
    /// An error with `retryable` taken from the code.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ErrorBody {
        let code = code.into();
        ErrorBody {
            retryable: self::code::retryable(&code),
            code,
            message: message.into(),
        }
    }
}

/// The error a handler returns: a reply with `success: false`.
pub type ServiceError = ErrorBody;

impl ErrorBody {
    /// `BAD_REQUEST`: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> ErrorBody {
        ErrorBody::new(code::BAD_REQUEST, message)
    }

    /// `NOT_FOUND`.
    pub fn not_found(message: impl Into<String>) -> ErrorBody {
        ErrorBody::new(code::NOT_FOUND, message)
    }

    /// `INTERNAL_ERROR`: the handler failed.
    pub fn internal(message: impl Into<String>) -> ErrorBody {
        ErrorBody::new(code::INTERNAL_ERROR, message)
    }

    /// `SERVICE_UNAVAILABLE`: try again later.
    pub fn unavailable(message: impl Into<String>) -> ErrorBody {
        ErrorBody::new(code::SERVICE_UNAVAILABLE, message)
    }

    /// Sets whether the request may be retried.
    pub fn retryable(mut self, retryable: bool) -> ErrorBody {
        self.retryable = retryable;
        self
    }
}

impl std::error::Error for ErrorBody {}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A reply as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyBody {
    /// Whether the request succeeded.
    pub success: bool,
    /// The handler's result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// The error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// The request's correlation id, or one made up for it.
    pub request_id: String,
    /// The `correlation_id` of a JSON request, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The `session_id` of a JSON request, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The service that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The instance that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// When the reply was made (RFC 3339, UTC).
    pub timestamp: String,
}

/// The fields of a JSON request object that address the request rather than being its data.
/// They are taken out before the handler sees the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestMeta {
    /// Where to send the reply (MQTT 3.1.1 callers).
    pub reply_to: Option<String>,
    /// Echoed in the reply.
    pub correlation_id: Option<String>,
    /// Echoed in the reply (the older name for a correlation id).
    pub session_id: Option<String>,
    /// Absolute deadline, Unix epoch milliseconds.
    pub deadline_ms: Option<u64>,
}

/// The user property naming the client that sent a request (its MQTT client id), as the
/// runtime states it.
pub const CALLER: &str = "caller";
/// The user property naming the service that sent a request, when a service did.
pub const CALLER_SERVICE: &str = "caller_service";

/// The MQTT 5 user property in which edgebus's broker names the user it authenticated the
/// publisher of a request as (absent: anonymous). The broker removes any the client sent.
pub const VERIFIED_USER: &str = "edgebus-user";
/// The user property in which edgebus's broker names the publisher's client id.
pub const VERIFIED_CLIENT_ID: &str = "edgebus-client-id";

/// Whether `topic` is a request as the contract spells it (`…/request`): the broker stamps
/// these with the publisher's identity.
pub fn is_request_topic(topic: &str) -> bool {
    topic.ends_with("/request")
}

/// Field names [`RequestMeta`] takes out of a request object.
pub const META_FIELDS: &[&str] = &["reply_to", "correlation_id", "session_id", "deadline_ms"];

/// Decodes a request payload as an endpoint does before its handler runs: empty or blank is
/// `null`, anything else must be JSON; an object's metadata fields (`reply_to`,
/// `correlation_id`, `session_id`, `deadline_ms`) are taken out. The error says what is wrong.
pub fn decode_request(payload: &[u8]) -> Result<(Value, RequestMeta), String> {
    let mut data: Value = if payload.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(payload).map_err(|e| format!("malformed JSON: {e}"))?
    };
    let meta = RequestMeta::take(&mut data)?;
    Ok((data, meta))
}

impl RequestMeta {
    /// Takes the metadata fields out of a request object. A field of the wrong type is an
    /// error naming it.
    pub fn take(payload: &mut Value) -> Result<RequestMeta, String> {
        let Value::Object(map) = payload else {
            return Ok(RequestMeta::default());
        };
        let string = |map: &mut Map<String, Value>, k: &str| -> Result<Option<String>, String> {
            match map.remove(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(Value::Number(n)) if k != "reply_to" => Ok(Some(n.to_string())),
                Some(_) => Err(format!("field `{k}`: expected string")),
            }
        };
        let reply_to = string(map, "reply_to")?;
        let correlation_id = string(map, "correlation_id")?;
        let session_id = string(map, "session_id")?;
        let deadline_ms = match map.remove("deadline_ms") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                "field `deadline_ms`: expected Unix epoch milliseconds (integer)".to_string()
            })?),
        };
        Ok(RequestMeta {
            reply_to,
            correlation_id,
            session_id,
            deadline_ms,
        })
    }
}

/// Now as Unix epoch milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Now as an RFC 3339 UTC string with milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn meta_is_taken_out() {
        let mut v = json!({"reply_to": "r/1", "correlation_id": 7, "deadline_ms": 5, "x": 1});
        let m = RequestMeta::take(&mut v).expect("meta");
        assert_eq!(m.reply_to.as_deref(), Some("r/1"));
        assert_eq!(m.correlation_id.as_deref(), Some("7"));
        assert_eq!(m.deadline_ms, Some(5));
        assert_eq!(v, json!({"x": 1}));
        let mut v = json!({"reply_to": 3});
        assert!(RequestMeta::take(&mut v).unwrap_err().contains("reply_to"));
        let mut v = json!({"deadline_ms": "soon"});
        assert!(RequestMeta::take(&mut v)
            .unwrap_err()
            .contains("deadline_ms"));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = timestamp();
        assert!(t.ends_with('Z') && t.len() == 24, "{t}");
    }
}
