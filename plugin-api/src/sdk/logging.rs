//! Forwards the plugin's `tracing` events into the host's log.
//!
//! The plugin's copy of `tracing` has its own global dispatcher; without this, a
//! plugin's events vanish. The subscriber below turns each event into text and hands it to
//! the host's [`LogSink`], which re-emits it under the plugin's name. Spans are not kept.

use std::fmt::Write;
use std::sync::OnceLock;

use abi_stable::std_types::RStr;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::ffi::LogSink;

static SINK: OnceLock<(LogSink, &'static str)> = OnceLock::new();

/// Installs the forwarder (once per library; later calls are ignored).
pub(crate) fn install(sink: LogSink, plugin: &'static str) {
    if SINK.set((sink, plugin)).is_ok() {
        // Fails when the plugin is linked into the host as an rlib and shares its
        // dispatcher (and panic hook): then events already reach the host directly.
        if tracing::subscriber::set_global_default(Forwarder).is_ok() {
            // The library's own std has its own panic hook, which would print unstructured
            // text to stderr: report panics through the log instead. They are still caught
            // and returned as `panicked` errors.
            std::panic::set_hook(Box::new(|info| {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                tracing::error!(location = %location, "plugin panicked: {}", panic_text(info.payload()));
            }));
        }
    }
}

pub(crate) fn level_code(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

struct Forwarder;

#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={:?}", field.name(), value);
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={:?}", field.name(), value);
        }
    }
}

impl Subscriber for Forwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::INFO
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::INFO)
    }
    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _span: &Id, _values: &Record<'_>) {}
    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let Some((sink, plugin)) = SINK.get() else {
            return;
        };
        let mut text = Text::default();
        event.record(&mut text);
        let meta = event.metadata();
        (sink.emit)(
            level_code(meta.level()),
            RStr::from_str(plugin),
            RStr::from_str(meta.target()),
            RStr::from_str(&text.message),
            RStr::from_str(&text.fields),
        );
    }
    fn enter(&self, _span: &Id) {}
    fn exit(&self, _span: &Id) {}
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
