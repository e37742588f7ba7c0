//! The request log line, laid out by hand exactly as `tracing_subscriber::fmt` lays out the
//! same event (text or JSON), so the line reads the same whichever path wrote it.
//!
//! `tracing`'s formatting (a field visitor per value, `Debug` through `dyn` calls, a writer
//! per event) cost about a fifth of berth's manifest-hit throughput; this costs a few
//! `write!`s into one buffer. It only lays out: whether a line is logged, dropped or waited
//! for is `api::record`'s and `logs`' business. Plain text only: the writer never adds
//! colour codes (`serve` keeps `tracing` for a terminal).

use std::io::Write;
use std::time::SystemTime;

use crate::logs::Layout;

/// The target of the policy mode's request lines (the allow/deny audit trail): the module that
/// has always logged them, so filters and collectors keep matching.
const AUDIT_TARGET: &str = "berth::api::record";

/// The fields of one request's line, as `api::record` knows them when its body ends.
pub struct RequestLine<'a> {
    pub id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    pub principal: &'a str,
    pub status: u16,
    pub cache: &'a str,
    pub bytes: u64,
    pub body: &'a str,
    pub ttfb_ms: f64,
    pub ms: f64,
    pub error: Option<&'a str>,
}

impl RequestLine<'_> {
    /// Logs the line: written by hand to the log queue when `logs` took request lines, else
    /// through `tracing`. A line of the policy mode (`audit`: it names a principal) keeps the
    /// target it always had and is never dropped; the others use `logs::REQUEST_TARGET`.
    pub fn log(&self, audit: bool) {
        use crate::logs::{send_request_line, REQUEST_TARGET};
        use tracing::Level;
        let (target, enabled) = match audit {
            true => (
                AUDIT_TARGET,
                tracing::enabled!(target: AUDIT_TARGET, Level::INFO),
            ),
            false => (
                REQUEST_TARGET,
                tracing::enabled!(target: REQUEST_TARGET, Level::INFO),
            ),
        };
        let sent = enabled
            && send_request_line(!audit, |out, layout| {
                write(out, layout, target, SystemTime::now(), &self.fields())
            });
        if enabled && !sent {
            self.trace(audit);
        }
    }

    /// The same event through `tracing` (its subscriber formats and writes it).
    fn trace(&self, audit: bool) {
        macro_rules! event {
            ($target:expr) => {
                tracing::info!(
                    target: $target,
                    request_id = %self.id,
                    method = %self.method,
                    path = %self.path,
                    route = self.route,
                    upstream = self.upstream,
                    principal = self.principal,
                    status = self.status,
                    cache = self.cache,
                    bytes = self.bytes,
                    body = self.body,
                    ttfb_ms = self.ttfb_ms,
                    ms = self.ms,
                    error = self.error,
                    "request"
                )
            };
        }
        match audit {
            true => event!(AUDIT_TARGET),
            false => event!(crate::logs::REQUEST_TARGET),
        }
    }

    /// The fields in `trace`'s order, typed as it records them.
    fn fields(&self) -> [(&'static str, Value<'_>); 13] {
        [
            ("request_id", Value::Shown(self.id)),
            ("method", Value::Shown(self.method)),
            ("path", Value::Shown(self.path)),
            ("route", Value::Str(self.route)),
            ("upstream", Value::Str(self.upstream)),
            ("principal", Value::Str(self.principal)),
            ("status", Value::Int(self.status.into())),
            ("cache", Value::Str(self.cache)),
            ("bytes", Value::Int(self.bytes)),
            ("body", Value::Str(self.body)),
            ("ttfb_ms", Value::Float(self.ttfb_ms)),
            ("ms", Value::Float(self.ms)),
            ("error", self.error.map_or(Value::Absent, Value::Str)),
        ]
    }
}

/// One value of a request line, typed as `tracing` records it.
#[derive(Clone, Copy)]
enum Value<'a> {
    /// Recorded with `%` (Display): unquoted in text.
    Shown(&'a str),
    /// A `&str` field: quoted (Debug) in text.
    Str(&'a str),
    Int(u64),
    Float(f64),
    /// An `Option` that is `None`: not written at all.
    Absent,
}

/// Writes the `request` event of target `target` with `fields`, in order, at `now`.
fn write(
    out: &mut Vec<u8>,
    layout: Layout,
    target: &str,
    now: SystemTime,
    fields: &[(&str, Value<'_>)],
) {
    let time = humantime::format_rfc3339_micros(now);
    let fields = fields.iter().filter(|(_, v)| !matches!(v, Value::Absent));
    match layout {
        Layout::Text => {
            let _ = write!(out, "{time}  INFO {target}: request");
            for (name, value) in fields {
                let _ = match value {
                    Value::Shown(text) => write!(out, " {name}={text}"),
                    Value::Str(text) => write!(out, " {name}={text:?}"),
                    Value::Int(n) => write!(out, " {name}={n}"),
                    Value::Float(x) => write!(out, " {name}={x:?}"),
                    Value::Absent => Ok(()),
                };
            }
        }
        Layout::Json => {
            let _ = write!(
                out,
                r#"{{"timestamp":"{time}","level":"INFO","fields":{{"message":"request""#
            );
            for (name, value) in fields {
                let _ = write!(out, r#","{name}":"#);
                let _ = match value {
                    Value::Shown(text) | Value::Str(text) => serde_json::to_writer(&mut *out, text),
                    Value::Int(n) => serde_json::to_writer(&mut *out, n),
                    Value::Float(x) => serde_json::to_writer(&mut *out, x),
                    Value::Absent => Ok(()),
                };
            }
            let _ = write!(out, r#"}},"target":"#);
            let _ = serde_json::to_writer(&mut *out, target);
            out.push(b'}');
        }
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What `tracing_subscriber::fmt` writes for `line`, without the time, and what `write`
    /// writes with the time cut off the same way.
    fn both(line: &RequestLine<'_>, layout: Layout, audit: bool) -> (String, String) {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&captured);
        let writer = move || Capture(Arc::clone(&sink));
        let builder = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_writer(writer);
        let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match layout {
            Layout::Text => Box::new(builder.finish()),
            Layout::Json => Box::new(builder.json().finish()),
        };
        tracing::subscriber::with_default(subscriber, || line.trace(audit));
        let traced = String::from_utf8(captured.lock().unwrap().clone()).unwrap();
        let target = if audit {
            AUDIT_TARGET
        } else {
            crate::logs::REQUEST_TARGET
        };
        let mut out = Vec::new();
        write(&mut out, layout, target, SystemTime::now(), &line.fields());
        let written = String::from_utf8(out).unwrap();
        let written = match layout {
            Layout::Text => written.split_once(' ').unwrap().1.to_string(),
            Layout::Json => {
                let mut json: serde_json::Value = serde_json::from_str(&written).unwrap();
                json.as_object_mut().unwrap().remove("timestamp").unwrap();
                format!("{json}\n")
            }
        };
        let traced = match layout {
            Layout::Text => traced,
            Layout::Json => {
                let json: serde_json::Value = serde_json::from_str(&traced).unwrap();
                format!("{json}\n")
            }
        };
        (traced, written)
    }

    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(error: Option<&str>) -> RequestLine<'_> {
        RequestLine {
            id: "0123abcd",
            method: "GET",
            path: "/v2/team/app/manifests/v1",
            route: "manifest",
            upstream: "hub",
            principal: "-",
            status: 404,
            cache: "MISS",
            bytes: 1234,
            body: "complete",
            ttfb_ms: 1.0,
            ms: 12.3,
            error,
        }
    }

    #[test]
    fn a_line_written_by_hand_reads_as_the_one_tracing_writes() {
        let error = Some("manifest \"v1\" unknown\tto the upstream");
        for layout in [Layout::Text, Layout::Json] {
            for audit in [false, true] {
                for line in [line(None), line(error)] {
                    let (traced, written) = both(&line, layout, audit);
                    assert_eq!(written, traced, "{layout:?}, audit {audit}");
                }
            }
        }
    }
}
