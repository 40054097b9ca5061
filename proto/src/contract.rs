//! The `[[service]]` part of topics.toml: each service's endpoints and events, and the
//! payload schemas requests and events are checked against before any handler runs.
//!
//! ```toml
//! [[service]]
//! name = "echo"
//!
//! [[service.endpoint]]
//! name = "echo"            # requests on {prefix}/echo/echo/request
//! qos = 1
//! timeout = "5s"
//! max_concurrency = 32
//! schema = { text = "string", repeat = "integer?" }
//!
//! [[service.event]]
//! name = "said"            # events on {prefix}/echo/events/said
//! qos = 0
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::duration;
use crate::policy::{CircuitConfig, Rate, RetryPolicy};
use crate::topic::check_topic;

/// Service names that are topic subtrees of the bus itself.
pub const RESERVED_SERVICE_NAMES: &[&str] = &["health", "system", "broadcast", "saga"];

/// One service's declared topics.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service name: the second topic level (`edge/{name}/…`).
    pub name: String,
    /// One line for humans, shown in the registry.
    #[serde(default)]
    pub description: String,
    /// Request/response endpoints.
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointSpec>,
    /// Event streams the service publishes.
    #[serde(default, rename = "event")]
    pub events: Vec<EventSpec>,
    /// What the service can do (free words, for discovery queries).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Free labels, for discovery queries.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A request/response endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Endpoint name: the third topic level (`edge/{service}/{name}/request`).
    pub name: String,
    /// Base topic instead of `{prefix}/{service}/{name}`; `/request`, `/result` and `/error`
    /// are appended to it.
    #[serde(default)]
    pub topic: Option<String>,
    /// QoS of requests (as subscribed) and replies: 0 or 1.
    #[serde(default = "default_endpoint_qos")]
    pub qos: u8,
    /// Longest a handler may run; past it the caller gets `TIMEOUT`.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Most requests handled at once by one instance; more wait their turn.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// Shape the request payload must have; checked before the handler runs.
    #[serde(default)]
    pub schema: Option<Schema>,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// How callers retry a failed request (callers that load this contract).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Callers' circuit breaker for this endpoint: past `failure_threshold` consecutive
    /// failures, requests fail at once with `CIRCUIT_OPEN` until `reset_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit: Option<CircuitConfig>,
    /// Requests each instance admits (`"200/s"`); the excess is answered `RATE_LIMITED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Rate>,
    /// Recent requests each instance remembers by correlation (0: none). A duplicate, such
    /// as a QoS 1 redelivery or a caller's retry, runs the handler once and gets the same
    /// reply again.
    #[serde(default = "default_dedupe_size")]
    pub dedupe_size: usize,
    /// How long a request is remembered for duplicates.
    #[serde(default = "default_dedupe_for", with = "duration")]
    pub dedupe_for: Duration,
}

/// An event stream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// Event type: the levels after `events/` (`edge/{service}/events/{name}`); may hold `/`.
    pub name: String,
    /// Topic instead of `{prefix}/{service}/events/{name}`.
    #[serde(default)]
    pub topic: Option<String>,
    /// QoS events are published with.
    #[serde(default)]
    pub qos: u8,
    /// Whether the broker keeps the last event for new subscribers.
    #[serde(default)]
    pub retain: bool,
    /// Shape the event `data` must have; checked before it is published.
    #[serde(default)]
    pub schema: Option<Schema>,
}

fn default_endpoint_qos() -> u8 {
    1
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_concurrency() -> usize {
    16
}
fn default_dedupe_size() -> usize {
    1024
}
fn default_dedupe_for() -> Duration {
    Duration::from_secs(300)
}

impl EndpointSpec {
    /// An endpoint with every setting at its default.
    pub fn new(name: impl Into<String>) -> EndpointSpec {
        EndpointSpec {
            name: name.into(),
            topic: None,
            qos: default_endpoint_qos(),
            timeout: default_timeout(),
            max_concurrency: default_concurrency(),
            schema: None,
            description: String::new(),
            retry: None,
            circuit: None,
            rate_limit: None,
            dedupe_size: default_dedupe_size(),
            dedupe_for: default_dedupe_for(),
        }
    }

    /// The base topic: `topic`, or `{prefix}/{service}/{name}`.
    pub fn base_topic(&self, prefix: &str, service: &str) -> String {
        match &self.topic {
            Some(t) => t.trim_end_matches('/').to_owned(),
            None => crate::tree::Tree::new(prefix).endpoint_base(service, &self.name),
        }
    }

    /// The request topic: `{base}/request`.
    pub fn request_topic(&self, prefix: &str, service: &str) -> String {
        crate::tree::request_under(&self.base_topic(prefix, service))
    }
}

impl EventSpec {
    /// An event with every setting at its default (QoS 0, not retained, no schema).
    pub fn new(name: impl Into<String>) -> EventSpec {
        EventSpec {
            name: name.into(),
            topic: None,
            qos: 0,
            retain: false,
            schema: None,
        }
    }

    /// The topic events are published on.
    pub fn topic(&self, prefix: &str, service: &str) -> String {
        match &self.topic {
            Some(t) => t.clone(),
            None => format!("{prefix}/{service}/events/{}", self.name),
        }
    }
}

/// A contract error: the dotted key path inside `[[service]]` and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractError {
    /// Key path such as `service[1].endpoint[0].qos`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ContractError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.path, self.message)
    }
}

impl std::error::Error for ContractError {}

/// Checks a name used as one topic level: letters, digits, `-` and `_`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("`{name}` must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "`{name}` may hold only letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

/// Validates every `[[service]]` against the bus prefix.
pub fn validate(services: &[ServiceSpec], prefix: &str) -> Result<(), ContractError> {
    let err = |path: String, message: String| ContractError { path, message };
    let mut seen_services = std::collections::HashSet::new();
    let mut seen_topics = std::collections::HashMap::new();
    for (i, s) in services.iter().enumerate() {
        let at = format!("service[{i}]");
        check_name(&s.name).map_err(|m| err(format!("{at}.name"), m))?;
        if RESERVED_SERVICE_NAMES.contains(&s.name.as_str()) {
            return Err(err(
                format!("{at}.name"),
                format!(
                    "`{}` is reserved for the bus's own topics ({})",
                    s.name,
                    RESERVED_SERVICE_NAMES.join(", ")
                ),
            ));
        }
        if !seen_services.insert(s.name.as_str()) {
            return Err(err(
                format!("{at}.name"),
                format!("service `{}` is declared twice", s.name),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (j, e) in s.endpoints.iter().enumerate() {
            let at = format!("{at}.endpoint[{j}]");
            check_name(&e.name).map_err(|m| err(format!("{at}.name"), m))?;
            if e.name == "events" {
                return Err(err(
                    format!("{at}.name"),
                    "`events` is the service's event subtree".into(),
                ));
            }
            if !names.insert(e.name.as_str()) {
                return Err(err(
                    format!("{at}.name"),
                    format!("endpoint `{}` is declared twice", e.name),
                ));
            }
            if let Some(t) = &e.topic {
                check_topic(t).map_err(|m| err(format!("{at}.topic"), format!("`{t}`: {m}")))?;
                if t.starts_with('$') {
                    return Err(err(
                        format!("{at}.topic"),
                        "topics starting with `$` are the broker's".into(),
                    ));
                }
            }
            if e.qos > 1 {
                return Err(err(format!("{at}.qos"), "qos must be 0 or 1".into()));
            }
            if e.timeout.is_zero() {
                return Err(err(
                    format!("{at}.timeout"),
                    "timeout must be above 0".into(),
                ));
            }
            if e.max_concurrency == 0 {
                return Err(err(
                    format!("{at}.max_concurrency"),
                    "max_concurrency must be at least 1".into(),
                ));
            }
            if let Some(r) = &e.retry {
                r.validate()
                    .map_err(|(key, m)| err(format!("{at}.retry.{key}"), m))?;
            }
            if let Some(c) = &e.circuit {
                c.validate()
                    .map_err(|(key, m)| err(format!("{at}.circuit.{key}"), m))?;
            }
            let base = e.base_topic(prefix, &s.name);
            if let Some(other) = seen_topics.insert(base.clone(), at.clone()) {
                return Err(err(
                    format!("{at}.topic"),
                    format!("base topic `{base}` is already used by {other}"),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (j, e) in s.events.iter().enumerate() {
            let at = format!("{at}.event[{j}]");
            for level in e.name.split('/') {
                check_name(level).map_err(|m| err(format!("{at}.name"), m))?;
            }
            if !names.insert(e.name.as_str()) {
                return Err(err(
                    format!("{at}.name"),
                    format!("event `{}` is declared twice", e.name),
                ));
            }
            if let Some(t) = &e.topic {
                check_topic(t).map_err(|m| err(format!("{at}.topic"), format!("`{t}`: {m}")))?;
            }
            if e.qos > 1 {
                return Err(err(format!("{at}.qos"), "qos must be 0 or 1".into()));
            }
        }
    }
    Ok(())
}

/// The shape of a JSON object: each field's type, `?` after the type for an optional field.
///
/// Types: `string`, `number`, `integer`, `boolean`, `object`, `array`, `any`.
/// Fields not named are allowed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Schema {
    fields: BTreeMap<String, FieldType>,
}

/// The type of one schema field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldType {
    kind: Kind,
    optional: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
    Any,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Number => "number",
            Kind::Integer => "integer",
            Kind::Boolean => "boolean",
            Kind::Object => "object",
            Kind::Array => "array",
            Kind::Any => "any",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "string" => Kind::String,
            "number" => Kind::Number,
            "integer" => Kind::Integer,
            "boolean" | "bool" => Kind::Boolean,
            "object" => Kind::Object,
            "array" => Kind::Array,
            "any" => Kind::Any,
            _ => return None,
        })
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            Kind::String => v.is_string(),
            Kind::Number => v.is_number(),
            Kind::Integer => v.is_i64() || v.is_u64(),
            Kind::Boolean => v.is_boolean(),
            Kind::Object => v.is_object(),
            Kind::Array => v.is_array(),
            Kind::Any => true,
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl TryFrom<BTreeMap<String, String>> for Schema {
    type Error = String;

    fn try_from(map: BTreeMap<String, String>) -> Result<Schema, String> {
        let mut fields = BTreeMap::new();
        for (name, ty) in map {
            let (base, optional) = match ty.strip_suffix('?') {
                Some(b) => (b, true),
                None => (ty.as_str(), false),
            };
            let kind = Kind::parse(base.trim()).ok_or_else(|| {
                format!(
                    "field `{name}`: unknown type `{ty}` (use string, number, integer, boolean, \
                     object, array or any, with `?` for optional)"
                )
            })?;
            fields.insert(name, FieldType { kind, optional });
        }
        Ok(Schema { fields })
    }
}

impl From<Schema> for BTreeMap<String, String> {
    fn from(s: Schema) -> Self {
        s.fields
            .into_iter()
            .map(|(k, t)| {
                let q = if t.optional { "?" } else { "" };
                (k, format!("{}{q}", t.kind.name()))
            })
            .collect()
    }
}

impl Schema {
    /// Checks a payload; the error names the first field that does not fit.
    pub fn check(&self, v: &Value) -> Result<(), String> {
        let Some(obj) = v.as_object() else {
            return Err(format!(
                "payload must be a JSON object, got {}",
                json_type(v)
            ));
        };
        for (name, t) in &self.fields {
            match obj.get(name) {
                None | Some(Value::Null) if t.optional => {}
                None => return Err(format!("missing field `{name}` ({})", t.kind.name())),
                Some(v) if !t.kind.accepts(v) => {
                    return Err(format!(
                        "field `{name}`: expected {}, got {}",
                        t.kind.name(),
                        json_type(v)
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(pairs: &[(&str, &str)]) -> Schema {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Schema::try_from(map).expect("schema")
    }

    #[test]
    fn schema_names_the_field() {
        let s = schema(&[("text", "string"), ("n", "integer?")]);
        assert!(s.check(&json!({"text": "hi"})).is_ok());
        assert!(s.check(&json!({"text": "hi", "n": 3, "extra": 1})).is_ok());
        let e = s.check(&json!({"n": 3})).unwrap_err();
        assert!(e.contains("`text`"), "{e}");
        let e = s.check(&json!({"text": 1})).unwrap_err();
        assert_eq!(e, "field `text`: expected string, got integer");
        let e = s.check(&json!({"text": "a", "n": 1.5})).unwrap_err();
        assert!(e.contains("`n`"), "{e}");
        assert!(s.check(&json!([1])).is_err());
        assert!(Schema::try_from(BTreeMap::from([("a".to_string(), "str".to_string())])).is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let mut s = ServiceSpec {
            name: "echo".into(),
            ..Default::default()
        };
        s.endpoints.push(EndpointSpec::new("echo"));
        let mut bad = EndpointSpec::new("slow");
        bad.qos = 2;
        s.endpoints.push(bad);
        let e = validate(&[s.clone()], "edge").unwrap_err();
        assert_eq!(e.path, "service[0].endpoint[1].qos");
        s.endpoints.pop();
        s.endpoints.push(EndpointSpec::new("echo"));
        let e = validate(&[s.clone()], "edge").unwrap_err();
        assert_eq!(e.path, "service[0].endpoint[1].name");
        s.endpoints.pop();
        assert!(validate(&[s.clone()], "edge").is_ok());
        s.name = "health".into();
        assert!(validate(&[s], "edge").is_err());
    }
}
