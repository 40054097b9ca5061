//! A request as a handler sees it, and how its JSON is decoded into the handler's type.

use super::*;
use crate::wire;

/// Who sent a request ([`Request::caller`]): as edgebus's broker vouches for it
/// (`verified`), or else as the caller says; `None` where neither said (a `mosquitto_rr` on
/// another broker, an MQTT 3.1.1 client).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caller<'a> {
    /// The caller's MQTT client id.
    pub client_id: Option<&'a str>,
    /// The caller's service, when a service called (as it says).
    pub service: Option<&'a str>,
    /// The user the broker authenticated the caller as; `None` for an anonymous caller, and
    /// whenever the broker did not vouch.
    pub user: Option<&'a str>,
    /// Whether the broker vouched for `client_id` and `user` (edgebus's broker does).
    pub verified: bool,
}

/// A request as a handler sees it.
#[derive(Debug, Clone)]
pub struct Request<T> {
    /// The payload, with the addressing fields (`reply_to`, `correlation_id`, `session_id`,
    /// `deadline_ms`) taken out.
    pub data: T,
    /// The topic the request came on.
    pub topic: String,
    /// The caller's correlation id, if it gave one.
    pub correlation_id: Option<String>,
    /// When the caller stops waiting, if it said.
    pub deadline: Option<Instant>,
    /// MQTT 5 user properties of the request.
    pub user_properties: Vec<(String, String)>,
    /// The bus, for calls to other services.
    pub bus: Bus,
    /// The service's events, for [`Request::emit`].
    pub(super) events: Emitter,
}

impl Request<Value> {
    /// The same request with its JSON decoded into the handler's type; a field that does not
    /// fit is `BAD_REQUEST` naming it.
    pub(super) fn decode<T: DeserializeOwned>(self) -> Result<Request<T>, ServiceError> {
        Ok(Request {
            data: decode_payload(self.data).map_err(ServiceError::bad_request)?,
            topic: self.topic,
            correlation_id: self.correlation_id,
            deadline: self.deadline,
            user_properties: self.user_properties,
            bus: self.bus,
            events: self.events,
        })
    }
}

impl<T> Request<T> {
    /// Publishes one of the service's declared events, carrying this request's
    /// correlation id.
    pub async fn emit<E: Serialize>(&self, event: &str, data: &E) -> Result<(), EventError> {
        self.events
            .emit_correlated(event, data, self.correlation_id.clone())
            .await
    }

    /// The state given to [`ServiceBuilder::with_state`], shared by every handler of the
    /// service.
    ///
    /// # Panics
    /// When the builder was given no state of type `S`: a programming error, which the
    /// request it happens in answers with `INTERNAL_ERROR` (handlers run under
    /// `catch_unwind`).
    pub fn state<S: Send + Sync + 'static>(&self) -> Arc<S> {
        self.events
            .0
            .state
            .clone()
            .and_then(|s| s.downcast::<S>().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no state of type {} (give it with ServiceBuilder::with_state)",
                    std::any::type_name::<S>()
                )
            })
    }

    /// Who sent the request. edgebus's broker vouches for the caller: it names the user it
    /// authenticated and the client id in every request (and removes any a client wrote
    /// itself), so `verified` is true and a handler may refuse with `FORBIDDEN` on them.
    /// Through another broker only what the caller states is known (the runtime names its
    /// client id and service, user properties `caller` and `caller_service`): use that to
    /// log and to route, and authorize on that broker's ACL.
    pub fn caller(&self) -> Caller<'_> {
        let vouched = self.user_property(wire::VERIFIED_CLIENT_ID);
        Caller {
            client_id: vouched.or_else(|| self.user_property(wire::CALLER)),
            service: self.user_property(wire::CALLER_SERVICE),
            user: vouched.and(self.user_property(wire::VERIFIED_USER)),
            verified: vouched.is_some(),
        }
    }

    /// The value of the request's MQTT 5 user property `key`, if it has one.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An event that could not be published fails the request that tried, as an internal error.
impl From<EventError> for ServiceError {
    fn from(e: EventError) -> ServiceError {
        ServiceError::internal(e.to_string())
    }
}

pub(super) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A type-erased endpoint handler.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request.
    fn call(&self, req: Request<Value>) -> BoxFuture<Result<Value, ServiceError>>;
}

pub(super) struct FnHandler<F>(pub(super) F);

impl<F> Handler for FnHandler<F>
where
    F: Fn(Request<Value>) -> BoxFuture<Result<Value, ServiceError>> + Send + Sync + 'static,
{
    fn call(&self, req: Request<Value>) -> BoxFuture<Result<Value, ServiceError>> {
        (self.0)(req)
    }
}

/// Decodes a request's JSON into a handler's type. The error names the field that does not
/// fit (``field `key`: invalid type: integer `5`, expected a string``), and speaks of JSON, never of
/// the Rust type it was decoded into.
pub fn decode_payload<T: DeserializeOwned>(data: Value) -> Result<T, String> {
    let empty = data.is_null();
    serde_path_to_error::deserialize(data).map_err(|e| {
        let path = e.path().to_string();
        let message = json_words(&e.into_inner().to_string());
        match (path.as_str(), empty) {
            (".", true) => format!("payload: empty; {message}"),
            (".", false) => format!("payload: {message}"),
            (p, _) => format!("field `{p}`: {message}"),
        }
    })
}

/// serde's "expected struct Put" / "expected tuple struct Pair" / "expected a map" spoken as
/// JSON: "expected a JSON object" / "expected a JSON array".
pub(super) fn json_words(message: &str) -> String {
    let mut out = message.to_owned();
    for (rust, json) in [
        ("expected tuple struct ", "expected a JSON array"),
        ("expected struct variant ", "expected a JSON object"),
        ("expected struct ", "expected a JSON object"),
        ("expected unit struct ", "expected null"),
        ("expected enum ", "expected one of its names"),
    ] {
        while let Some(at) = out.find(rust) {
            let rest = &out[at + rust.len()..];
            let name_len = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            out = format!("{}{json}{}", &out[..at], &rest[name_len..]);
        }
    }
    out.replace("expected a map", "expected a JSON object")
        .replace("expected a sequence", "expected a JSON array")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Put {
        key: String,
        value: Value,
        #[serde(default)]
        nested: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn decode_errors_name_the_field_and_speak_json() {
        let e = decode_payload::<Put>(serde_json::json!({"key": 5})).unwrap_err();
        assert!(
            e.starts_with("field `key`: invalid type: integer `5`"),
            "{e}"
        );
        let e = decode_payload::<Put>(
            serde_json::json!({"key": "a", "value": 1, "nested": {"n": "x"}}),
        )
        .unwrap_err();
        assert!(e.starts_with("field `nested.n`:"), "{e}");
        let e = decode_payload::<Put>(Value::Null).unwrap_err();
        assert!(e.starts_with("payload: empty;"), "{e}");
        assert!(e.contains("expected a JSON object"), "{e}");
        assert!(!e.contains("Put"), "a Rust type name leaked: {e}");
        let e = decode_payload::<Put>(serde_json::json!([1])).unwrap_err();
        assert!(!e.contains("Put"), "a Rust type name leaked: {e}");
        let e = decode_payload::<Put>(serde_json::json!({"value": 1})).unwrap_err();
        assert_eq!(e, "payload: missing field `key`");
    }
}
