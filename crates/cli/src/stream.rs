//! Framing for the two streamed response formats the CLI reads: NDJSON
//! (deploy progress) and server-sent events (log follow). Both arrive in
//! arbitrary chunks, so both start by cutting the bytes into lines.

/// Cuts a byte stream into lines. A line may span chunks, and a chunk may
/// split a UTF-8 character, so bytes are kept until their newline arrives.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

/// The most a single line may grow to before it is refused, so a server that
/// never sends a newline cannot make the CLI buffer without bound.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

impl LineBuffer {
    /// Adds a chunk and returns the lines it completed, without their `\n`
    /// or `\r\n`.
    pub fn push(&mut self, chunk: &[u8]) -> anyhow::Result<Vec<String>> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        if self.pending.len() > MAX_LINE {
            anyhow::bail!("the server sent a line longer than {MAX_LINE} bytes");
        }
        Ok(lines)
    }

    /// What is left once the stream ended: a last line without a newline.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty()).then(|| String::from_utf8_lossy(&rest).into_owned())
    }
}

/// One server-sent event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Assembles server-sent events from lines, following the parts of the
/// WHATWG rules berth uses: `id`, `event`, multi-line `data`, `:` comments
/// (keep-alives) and a blank line to dispatch.
#[derive(Default)]
pub struct SseParser {
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// Feeds one line; returns an event when the line ends one.
    pub fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let has_data = std::mem::take(&mut self.has_data);
            let event = std::mem::take(&mut self.current);
            return has_data.then_some(event);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_span_chunks() -> anyhow::Result<()> {
        let mut buf = LineBuffer::default();
        assert!(buf.push(b"{\"progress\":")?.is_empty());
        assert_eq!(buf.push(b" 1}\r\n{\"a\"")?, vec!["{\"progress\": 1}"]);
        assert_eq!(buf.push(b":2}\n\n")?, vec!["{\"a\":2}", ""]);
        assert_eq!(buf.finish(), None);
        buf.push(b"tail")?;
        assert_eq!(buf.finish().as_deref(), Some("tail"));
        Ok(())
    }

    #[test]
    fn split_utf8_survives() -> anyhow::Result<()> {
        let mut buf = LineBuffer::default();
        let bytes = "é\n".as_bytes();
        assert!(buf.push(&bytes[..1])?.is_empty());
        assert_eq!(buf.push(&bytes[1..])?, vec!["é"]);
        Ok(())
    }

    #[test]
    fn sse_events_dispatch_on_blank_line() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for line in [
            ": keep-alive",
            "",
            "id: 7",
            "event: created",
            "data: {\"a\":",
            "data:1}",
            "",
        ] {
            got.extend(p.line(line));
        }
        assert_eq!(
            got,
            vec![SseEvent {
                id: Some("7".into()),
                event: Some("created".into()),
                data: "{\"a\":\n1}".into(),
            }]
        );
    }
}
