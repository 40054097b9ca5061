//! Subscribers that fall behind: rumqttd keeps each filter's messages in a bounded in-memory
//! log, and a subscriber whose read cursor falls off the end of it skips to the head, losing
//! what it had not read, with only a log line (its `CursorJump` alert always says `lost: 0`).
//!
//! [`layer`] is a `tracing` layer that reads that log line as it is emitted, with the cursors
//! before and after the jump, so the exact number skipped is known; the broker then counts it
//! (`dropped.slow_subscriber` in the stats record), logs the client and filter, and publishes
//! `{"client_id", "filter", "lost", "at"}` on `{system topic}/lag` so that the client (the
//! edgebus runtime listens there) or an operator (`mosquitto_sub -t edge/system/broker/lag`)
//! learns of it. Install the layer in the process's subscriber; `edgebus` does.

use std::sync::Mutex;

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Messages one subscriber skipped on one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skip {
    /// The router's name for the connection.
    pub router_name: String,
    /// The filter whose log it fell off.
    pub filter: String,
    /// Messages skipped.
    pub lost: u64,
}

/// Brokers in this process that want to hear of skips.
static SINKS: Mutex<Vec<mpsc::UnboundedSender<Skip>>> = Mutex::new(Vec::new());

pub(crate) fn listen() -> mpsc::UnboundedReceiver<Skip> {
    let (tx, rx) = mpsc::unbounded_channel();
    SINKS.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
    rx
}

fn report(skip: Skip) {
    let mut sinks = SINKS.lock().unwrap_or_else(|e| e.into_inner());
    sinks.retain(|s| s.send(skip.clone()).is_ok());
}

/// The layer that notices skipped messages, already filtered to the two rumqttd callsites it
/// reads (the `outgoing_publish` span and the router's warnings), so nothing else in rumqttd
/// is turned on: add it to the process's `tracing` subscriber next to the log output.
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    LagLayer.with_filter(filter_fn(|meta| {
        meta.target() == "rumqttd::router::routing"
            && if meta.is_span() {
                meta.name() == "outgoing_publish"
            } else {
                *meta.level() == Level::WARN
            }
    }))
}

/// See [`layer`].
#[derive(Debug, Clone, Copy)]
pub struct LagLayer;

struct ClientId(String);

#[derive(Default)]
struct Fields {
    client_id: Option<String>,
    error: Option<String>,
    request_cursor: Option<String>,
    start_cursor: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.set(field, format!("{value:?}"));
    }
}

impl Fields {
    fn set(&mut self, field: &Field, value: String) {
        match field.name() {
            "client_id" => self.client_id = Some(value),
            "error" => self.error = Some(value),
            "request_cursor" => self.request_cursor = Some(value),
            "start_cursor" => self.start_cursor = Some(value),
            _ => {}
        }
    }
}

/// The absolute offset of a cursor written `(segment, offset)`.
fn offset(cursor: &str) -> Option<u64> {
    let inner = cursor.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner.split(',').nth(1)?.trim().parse().ok()
}

/// Reads rumqttd's "Read cursor start jumped from (a, x) to (b, y) on FILTER" event.
fn parse_jump(f: &Fields) -> Option<(String, u64)> {
    let error = f.error.as_deref()?.trim_matches('"');
    let rest = error.strip_prefix("Read cursor start jumped from ")?;
    let filter = rest.rsplit_once(" on ")?.1.to_owned();
    let from = offset(f.request_cursor.as_deref()?)?;
    let to = offset(f.start_cursor.as_deref()?)?;
    Some((filter, to.saturating_sub(from)))
}

impl<S> Layer<S> for LagLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "outgoing_publish" {
            return;
        }
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let (Some(client), Some(span)) = (f.client_id, ctx.span(id)) {
            span.extensions_mut().insert(ClientId(client));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if *event.metadata().level() != Level::WARN {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let Some((filter, lost)) = parse_jump(&f) else {
            return;
        };
        let client = ctx.event_scope(event).and_then(|scope| {
            scope
                .into_iter()
                .find_map(|s| s.extensions().get::<ClientId>().map(|c| c.0.clone()))
        });
        if let Some(router_name) = client {
            report(Skip {
                router_name,
                filter,
                lost,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_jump() {
        let f = Fields {
            client_id: None,
            error: Some("Read cursor start jumped from (0, 12) to (2, 2048) on test/#".into()),
            request_cursor: Some("(0, 12)".into()),
            start_cursor: Some("(2, 2048)".into()),
        };
        assert_eq!(parse_jump(&f), Some(("test/#".into(), 2036)));
        assert_eq!(offset("(3, 7)"), Some(7));
        assert_eq!(offset("garbage"), None);
    }
}
