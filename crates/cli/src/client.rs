//! The HTTP side of the CLI: one authenticated client for the berth API and
//! the mapping of the server's JSON errors to what the user sees.

use anyhow::{Context, Result};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use std::fmt;
use std::path::Path;

/// Where a dev server writes the key it minted at start-up, relative to its
/// data dir. Read only when no key was given, so `berth serve --dev` and the
/// client work together on one machine with no setup.
pub const DEV_KEY_FILE: &str = "dev-api-key";

/// An error the server reported in its JSON error body. Displayed as
/// `message (code)`, so `main` prints `error: message (code)`.
#[derive(Debug)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// Reads the server's `{"code", "message"}` body. Also accepts the body
    /// nested under `"error"`, and falls back to the HTTP status for bodies
    /// that are not berth errors (a proxy's page, an empty 502).
    pub fn from_body(status: u16, body: &[u8]) -> Self {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let obj = parsed.as_ref().map(|v| v.get("error").unwrap_or(v));
        let field = |k: &str| {
            obj.and_then(|o| o.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        match (field("code"), field("message")) {
            (Some(code), Some(message)) => Self { code, message },
            _ => {
                let text = String::from_utf8_lossy(body).trim().to_owned();
                let message = if text.is_empty() {
                    format!("HTTP status {status}")
                } else {
                    text
                };
                Self {
                    code: format!("http_{status}"),
                    message,
                }
            }
        }
    }
}

/// Percent-encodes one path segment, so ids can never change the path.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The key to send: the flag or `BERTH_API_KEY`, else the dev server's key
/// file in the data dir, else none (the server answers 401, which is clearer
/// than a client-side guess).
pub fn resolve_api_key(given: Option<String>, data_dir: &Path) -> Option<String> {
    if let Some(key) = given.filter(|k| !k.trim().is_empty()) {
        return Some(key.trim().to_owned());
    }
    let text = std::fs::read_to_string(data_dir.join(DEV_KEY_FILE)).ok()?;
    let key = text.trim();
    (!key.is_empty()).then(|| key.to_owned())
}

/// An authenticated client for one berth server.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    pub fn new(url: &str, key: Option<String>) -> Result<Self> {
        // No overall timeout: invocations and log follows stream for as long
        // as they need to. Only connecting is bounded.
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// A request to `path` (which starts with `/v1/`), with the bearer key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.key {
            Some(key) => rb.bearer_auth(key),
            None => rb,
        }
    }

    /// Sends, and turns any non-success status into an [`ApiError`].
    pub async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb
            .send()
            .await
            .with_context(|| format!("cannot reach the berth server at {}", self.base))?;
        check(resp).await
    }

    pub async fn json(&self, rb: RequestBuilder) -> Result<Value> {
        let resp = self.send(rb).await?;
        resp.json().await.context("reading the server's response")
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        let resp = self.send(self.request(Method::DELETE, path)).await?;
        // A delete may answer 204 with no body; that is success, not an error.
        let body = resp
            .bytes()
            .await
            .context("reading the server's response")?;
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&body).context("parsing the server's response")
    }
}

/// Passes a success through; reads the error body of anything else.
pub async fn check(resp: Response) -> Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    Err(ApiError::from_body(status.as_u16(), &body).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_reads_code_and_message() {
        let e = ApiError::from_body(404, br#"{"code":"not_found","message":"no such agent"}"#);
        assert_eq!(e.to_string(), "no such agent (not_found)");
        let nested = ApiError::from_body(400, br#"{"error":{"code":"bad","message":"m"}}"#);
        assert_eq!(nested.to_string(), "m (bad)");
    }

    #[test]
    fn api_error_falls_back_to_status() {
        assert_eq!(
            ApiError::from_body(502, b"").to_string(),
            "HTTP status 502 (http_502)"
        );
        assert_eq!(
            ApiError::from_body(500, b"oops\n").to_string(),
            "oops (http_500)"
        );
    }

    #[test]
    fn seg_escapes_everything_but_unreserved() {
        assert_eq!(seg("my-agent_1.0"), "my-agent_1.0");
        assert_eq!(seg("a/b c@d"), "a%2Fb%20c%40d");
    }

    #[test]
    fn api_key_falls_back_to_dev_key_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(resolve_api_key(None, dir.path()), None);
        std::fs::write(dir.path().join(DEV_KEY_FILE), "bk_dev\n")?;
        assert_eq!(resolve_api_key(None, dir.path()).as_deref(), Some("bk_dev"));
        let given = resolve_api_key(Some("bk_flag".into()), dir.path());
        assert_eq!(given.as_deref(), Some("bk_flag"));
        Ok(())
    }
}
