//! Log output: one event, one line, whatever a client put in it.
//!
//! Events carry strings a peer chose (group ids, member ids, client ids, topic
//! names inside error messages). Written as they are, a newline in one of them
//! starts what looks like a new log line, so a client could forge entries, and
//! other control characters could rewrite an operator's terminal. The writer
//! below escapes every control character inside an event; only the newline
//! that ends it stays. With colours on (a terminal), ESC is kept for the
//! formatter's own colour codes.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Makes [`EscapingWriter`]s over stderr.
#[derive(Clone, Copy, Debug)]
pub struct EscapingStderr {
    /// Keep ESC (the formatter writes colour codes).
    pub ansi: bool,
}

impl<'a> MakeWriter<'a> for EscapingStderr {
    type Writer = EscapingWriter<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter {
            inner: io::stderr(),
            ansi: self.ansi,
        }
    }
}

/// Writes each buffer it is given with interior control characters escaped.
/// The formatter hands it one whole event per `write_all`, so a trailing
/// newline is the event's end and every other one came from a field.
pub struct EscapingWriter<W> {
    inner: W,
    ansi: bool,
}

impl<W: Write> EscapingWriter<W> {
    #[cfg(test)]
    fn new(inner: W, ansi: bool) -> Self {
        EscapingWriter { inner, ansi }
    }
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        let ansi = self.ansi;
        let keep = |b: u8| !b.is_ascii_control() || b == b'\t' || (ansi && b == 0x1b);
        if body.iter().all(|&b| keep(b)) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                _ if keep(b) => out.push(b),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            }
        }
        out.extend_from_slice(end);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(input: &[u8], ansi: bool) -> String {
        let mut w = EscapingWriter::new(Vec::new(), ansi);
        w.write_all(input).unwrap();
        String::from_utf8(w.inner).unwrap()
    }

    #[test]
    fn an_event_stays_one_line() {
        assert_eq!(
            escaped(b"INFO group=evil\nINFO forged\r\n", false),
            "INFO group=evil\\nINFO forged\\r\n"
        );
        assert_eq!(escaped(b"plain line\n", false), "plain line\n");
        assert_eq!(escaped(b"no newline", false), "no newline");
    }

    #[test]
    fn control_characters_are_escaped_unless_colours_need_them() {
        assert_eq!(
            escaped(b"a\x1b[2Jb\x07\tc\n", false),
            "a\\x1b[2Jb\\x07\tc\n"
        );
        assert_eq!(escaped(b"a\x1b[1mb\x00\n", true), "a\x1b[1mb\\x00\n");
    }

    #[test]
    fn utf8_passes_unchanged() {
        assert_eq!(
            escaped("grüße → 日本\n".as_bytes(), false),
            "grüße → 日本\n"
        );
    }
}
