//! The JSON log line: one object per event with its fields at the top level, the ids of the
//! call it belongs to (`trace_id`, `span_id`, `request_id`) beside them, and the current span.

use std::fmt;

use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    fmt::{
        FmtContext, FormatEvent, FormattedFields,
        format::{JsonFields, Writer},
        time::{FormatTime as _, SystemTime},
    },
    registry::LookupSpan,
};

use crate::rpc::CallIds;

/// The event formatter of [`crate::LogFormat::Json`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct JsonLines;

/// Collects an event's fields into a JSON map.
struct Fields<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), meta.level().as_str().into());
        event.record(&mut Fields(&mut line));
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut current = true;
            for span in scope {
                if current {
                    let mut fields = span
                        .extensions()
                        .get::<FormattedFields<JsonFields>>()
                        .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                        .unwrap_or_default();
                    fields.insert("name".into(), span.name().into());
                    line.insert("span".into(), Value::Object(fields));
                    current = false;
                }
                if let Some(ids) = span.extensions().get::<CallIds>() {
                    if let Some((trace_id, span_id)) = &ids.ids {
                        line.insert("trace_id".into(), trace_id.clone().into());
                        line.insert("span_id".into(), span_id.clone().into());
                    }
                    if let Some(id) = &ids.request_id {
                        line.insert("request_id".into(), id.clone().into());
                    }
                    break;
                }
            }
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}
