//! `berth invoke`: one request to an agent, its response streamed to stdout.

use crate::client::{seg, ApiError};
use crate::payload::read_payload;
use crate::Global;
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use reqwest::{Method, Response};
use std::io::{IsTerminal, Write};

/// The AgentCore-compatible header that names the session, both ways.
pub const SESSION_HEADER: &str = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id";

#[derive(clap::Args)]
pub struct InvokeArgs {
    agent: String,
    /// JSON body, `@file`, or `-` for stdin [default: {}].
    payload: Option<String>,
    /// Continue this session (a new one is created when it does not exist).
    #[arg(long)]
    session: Option<String>,
    /// Endpoint or version to invoke (server default: DEFAULT).
    #[arg(long)]
    qualifier: Option<String>,
    #[arg(long, default_value = "application/json")]
    content_type: String,
}

pub async fn run(g: &Global, args: InvokeArgs) -> Result<()> {
    let body = read_payload(args.payload.as_deref(), std::io::stdin().lock())?;
    let client = g.client()?;
    let path = format!("/v1/agents/{}/invocations", seg(&args.agent));
    let mut rb = client
        .request(Method::POST, &path)
        .header(reqwest::header::CONTENT_TYPE, &args.content_type)
        .body(body);
    if let Some(q) = &args.qualifier {
        rb = rb.query(&[("qualifier", q)]);
    }
    if let Some(s) = &args.session {
        rb = rb.header(SESSION_HEADER, s);
    }
    let resp = rb
        .send()
        .await
        .with_context(|| format!("cannot reach the berth server at {}", g.url))?;
    // On stderr so stdout stays exactly the agent's response.
    if let Some(s) = resp.headers().get(SESSION_HEADER) {
        eprintln!("session: {}", String::from_utf8_lossy(s.as_bytes()));
    }
    let status = resp.status();
    if status.is_success() {
        return copy_body(resp).await;
    }
    fail(resp).await
}

/// Writes each chunk as it arrives, flushing, so an SSE answer shows token by
/// token rather than at the end.
async fn copy_body(resp: Response) -> Result<()> {
    let mut body = resp.bytes_stream();
    let mut stdout = std::io::stdout();
    let mut last = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the agent's response")?;
        stdout.write_all(&chunk)?;
        stdout.flush()?;
        last = chunk.last().copied().or(last);
    }
    // Keeps the shell prompt off the answer's last line; a pipe gets the
    // body byte for byte.
    if stdout.is_terminal() && last.is_some_and(|b| b != b'\n') {
        writeln!(stdout)?;
    }
    Ok(())
}

/// A berth error (bad key, unknown agent, ...) is reported as such; anything
/// else is the agent's own error response, which goes to stdout untouched so
/// the caller still sees it, with a non-zero exit.
async fn fail(resp: Response) -> Result<()> {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    let err = ApiError::from_body(status, &body);
    if !err.code.starts_with("http_") {
        return Err(err.into());
    }
    std::io::stdout().write_all(&body)?;
    bail!("the agent answered HTTP status {status}")
}
