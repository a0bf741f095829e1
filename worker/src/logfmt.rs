//! [`LogFields`]: tracing-subscriber's default field format at a fraction of its cost.
//!
//! The worker opens a span for every job (`job{queue=.. job=.. id=.. attempt=..}`), and
//! tracing-subscriber's `fmt` layer formats a span's fields when the span is created, whether or
//! not anything is ever logged inside it. With `DefaultFields` that costs ~1,300 instructions per
//! field (measured with callgrind: 5,800 for the job span, a third of everything the runtime does
//! for a no-op job): every field goes through `write!` with colour wrappers that paint nothing
//! when colours are off, into a `String` that grows five times.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};
use tracing_subscriber::fmt::FormatFields;

/// A [`FormatFields`] for tracing-subscriber's `fmt` layer that writes exactly what
/// [`DefaultFields`] writes (`name=value` pairs separated by spaces, strings quoted and escaped as
/// `Debug` does, the `message` field bare), several times faster where it matters: plain strings,
/// integers, booleans and `%`/`?` values are written straight into a stack buffer, and the
/// span's text is allocated once. Anything else (the `message` field, errors and their sources,
/// `r#` names, `log.` metadata, and all output with colours on) is handed to `DefaultFields`'
/// own visitor, so it stays byte-for-byte the same.
///
/// [`App`](crate::App) installs it; use it in a subscriber of your own with
/// `tracing_subscriber::fmt().fmt_fields(stevedore::LogFields)`. Stateless, `Copy`, thread-safe.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogFields;

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            // A terminal: colours, and nobody counts instructions.
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut v = Visitor {
            writer,
            buf: Buf::new(),
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.finish()
    }
}

/// Bytes gathered before they go to the writer in one piece (the span's `String` then grows
/// once, to its final size).
struct Buf {
    bytes: [u8; 240],
    len: usize,
}

impl Buf {
    fn new() -> Self {
        Buf {
            bytes: [0; 240],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever copied in (see `write_str`), so the bytes are UTF-8.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

struct Visitor<'a> {
    writer: Writer<'a>,
    buf: Buf,
    is_empty: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// Moves what the buffer holds to the writer.
    fn flush(&mut self) {
        if self.buf.len > 0 {
            if self.result.is_ok() {
                self.result = self.writer.write_str(self.buf.as_str());
            }
            self.buf.len = 0;
        }
    }

    /// `name=` after the separating space, if this field is written here (not the `message`,
    /// an `r#` name or `log.` metadata, which [`DefaultVisitor`] writes its own way).
    fn name(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name == "message" || name.starts_with("r#") || name.starts_with("log.") {
            return false;
        }
        if !self.is_empty {
            let _ = self.write_str(" ");
        }
        self.is_empty = false;
        let _ = self.write_str(name);
        let _ = self.write_str("=");
        true
    }

    /// Hands one field to tracing-subscriber's own visitor, after what is buffered.
    fn fallback(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        self.flush();
        if self.result.is_err() {
            return;
        }
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        // It writes every field but `log.` metadata (which the `tracing-log` feature, on by
        // default, makes it skip).
        self.is_empty &= field.name().starts_with("log.");
    }

    fn finish(mut self) -> fmt::Result {
        self.flush();
        self.result
    }
}

impl fmt::Write for Visitor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.buf.len + s.len() > self.buf.bytes.len() {
            self.flush();
            if s.len() > self.buf.bytes.len() {
                if self.result.is_ok() {
                    self.result = self.writer.write_str(s);
                }
                return Ok(());
            }
        }
        self.buf.bytes[self.buf.len..self.buf.len + s.len()].copy_from_slice(s.as_bytes());
        self.buf.len += s.len();
        Ok(())
    }
}

/// Whether `Debug` of `s` is `"` + `s` + `"` (printable ASCII without quotes or backslashes).
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.name(field) {
            return self.fallback(field, |v| v.record_str(field, value));
        }
        if plain(value) {
            let _ = self.write_str("\"");
            let _ = self.write_str(value);
            let _ = self.write_str("\"");
        } else {
            let _ = write!(self, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if !self.name(field) {
            return self.fallback(field, |v| v.record_u64(field, value));
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = value;
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // ASCII digits.
        let _ = self.write_str(std::str::from_utf8(&digits[i..]).unwrap_or_default());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if value >= 0 {
            return self.record_u64(field, value as u64);
        }
        if !self.name(field) {
            return self.fallback(field, |v| v.record_i64(field, value));
        }
        let _ = write!(self, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !self.name(field) {
            return self.fallback(field, |v| v.record_bool(field, value));
        }
        let _ = self.write_str(if value { "true" } else { "false" });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.fallback(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.name(field) {
            return self.fallback(field, |v| v.record_debug(field, value));
        }
        let _ = write!(self, "{value:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Spans and events of every kind of field, as the given subscriber writes them.
    fn logged<N>(fields: N, ansi: bool) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(fields)
            .with_ansi(ansi)
            .without_time()
            .with_writer(sink.clone())
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let long = "x".repeat(300);
            let span = tracing::info_span!("job", queue = %"emails", job = "send_email", id = %"0193-ab", attempt = 2u32, late = tracing::field::Empty);
            let _g = span.enter();
            span.record("late", 7i64);
            tracing::info!("started");
            tracing::info!(
                n = -3i64,
                big = u64::MAX,
                ok = true,
                no = false,
                ratio = 0.5f64,
                "mixed {}",
                1
            );
            tracing::warn!(
                text = "say \"hi\"\n\tand ü",
                path = "C:\\x",
                empty = "",
                "escapes"
            );
            tracing::warn!(
                error = &Outer(std::io::Error::other("disk full"))
                    as &(dyn std::error::Error + 'static),
                "with sources"
            );
            tracing::warn!(
                error = &std::io::Error::other("plain") as &(dyn std::error::Error + 'static)
            );
            tracing::info!(r#type = "raw", dbg = ?vec![1, 2], disp = %3.25f32, long = %long, long_str = long.as_str());
            tracing::info!(message = "only a message field");
            tracing::info!(a = 1u64);
            let inner = tracing::debug_span!("inner", k = "v", "span message {}", 9);
            inner.in_scope(|| tracing::error!(x = 0u64, "\u{1b}[31mred\u{1b}[0m"));
            tracing::trace_span!("empty").in_scope(|| tracing::info!("in empty"));
        });
        let bytes = sink.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn writes_what_default_fields_writes() {
        let ours = logged(LogFields, false);
        let theirs = logged(DefaultFields::new(), false);
        assert!(
            ours.contains(r#"job{queue=emails job="send_email" id=0193-ab attempt=2 late=7}"#),
            "{ours}"
        );
        assert!(ours.lines().count() >= 10, "{ours}");
        for (a, b) in ours.lines().zip(theirs.lines()) {
            assert_eq!(a, b);
        }
        assert_eq!(ours, theirs);
    }

    #[test]
    fn with_colours_is_default_fields() {
        assert_eq!(logged(LogFields, true), logged(DefaultFields::new(), true));
    }
}
