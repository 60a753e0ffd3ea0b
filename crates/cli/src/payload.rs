//! Where an invocation's body comes from.

use anyhow::{Context, Result};
use std::io::Read;

/// The body used when no payload is given: an empty JSON object, which every
/// AgentCore-style agent accepts.
pub const DEFAULT_PAYLOAD: &[u8] = b"{}";

/// Reads the PAYLOAD argument: `-` is stdin, `@path` is a file's contents,
/// anything else is the body itself, and nothing is `{}`. The body is sent
/// as given, not re-encoded, because the content type may not be JSON.
pub fn read_payload(arg: Option<&str>, stdin: impl Read) -> Result<Vec<u8>> {
    match arg {
        None => Ok(DEFAULT_PAYLOAD.to_vec()),
        Some("-") => {
            let mut body = Vec::new();
            let mut stdin = stdin;
            stdin
                .read_to_end(&mut body)
                .context("reading the payload from stdin")?;
            Ok(body)
        }
        Some(arg) => match arg.strip_prefix('@') {
            Some(path) => {
                std::fs::read(path).with_context(|| format!("reading the payload file {path}"))
            }
            None => Ok(arg.as_bytes().to_vec()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_payload_is_an_empty_object() -> Result<()> {
        assert_eq!(read_payload(None, std::io::empty())?, b"{}");
        Ok(())
    }

    #[test]
    fn literal_is_sent_as_is() -> Result<()> {
        let body = read_payload(Some(r#"{"prompt": "hi"}"#), std::io::empty())?;
        assert_eq!(body, br#"{"prompt": "hi"}"#);
        Ok(())
    }

    #[test]
    fn dash_reads_stdin() -> Result<()> {
        let body = read_payload(Some("-"), &b"{\"from\":\"stdin\"}"[..])?;
        assert_eq!(body, b"{\"from\":\"stdin\"}");
        Ok(())
    }

    #[test]
    fn at_reads_a_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("p.json");
        std::fs::write(&path, b"{\"from\":\"file\"}")?;
        let arg = format!("@{}", path.display());
        assert_eq!(
            read_payload(Some(&arg), std::io::empty())?,
            b"{\"from\":\"file\"}"
        );
        Ok(())
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_payload(Some("@/nonexistent/p.json"), std::io::empty());
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("/nonexistent/p.json"), "{msg}");
    }
}
