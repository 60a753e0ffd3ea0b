//! `berth logs`: a session's events, paged or followed live.

use crate::client::{check, seg, ApiError, Client};
use crate::render::{self, out};
use crate::stream::{LineBuffer, SseParser};
use crate::Global;
use anyhow::{Context, Result};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// Events asked for per page.
const PAGE: u64 = 1000;
/// Pause before reconnecting a dropped follow, so a server that is down is
/// not hammered.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Session id.
    id: String,
    /// Only events with a sequence number above this.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Keep printing new events as they happen (Ctrl-C to stop).
    #[arg(long, short)]
    follow: bool,
}

pub async fn run(g: &Global, args: LogsArgs) -> Result<()> {
    let client = g.client()?;
    if args.follow {
        follow(g, &client, &args.id, args.after).await
    } else {
        page_all(g, &client, &args.id, args.after).await
    }
}

async fn page_all(g: &Global, client: &Client, id: &str, mut after: u64) -> Result<()> {
    let path = format!("/v1/sessions/{}/events", seg(id));
    loop {
        let rb = client
            .request(Method::GET, &path)
            .query(&[("after", after), ("limit", PAGE)]);
        let v = client.json(rb).await?;
        let events = v.get("events").and_then(Value::as_array);
        let Some(events) = events.filter(|e| !e.is_empty()) else {
            return Ok(());
        };
        for e in events {
            print_event(g, e)?;
        }
        let last = events
            .last()
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or(after);
        let next = v.get("next").and_then(Value::as_u64).unwrap_or(last);
        // A cursor that does not move would page forever.
        if next <= after {
            return Ok(());
        }
        after = next;
    }
}

/// Follows the SSE stream, reconnecting after the last seq seen whenever the
/// connection drops. Errors the server reports (bad key, no such session)
/// end the follow; network errors do not.
async fn follow(g: &Global, client: &Client, id: &str, mut after: u64) -> Result<()> {
    loop {
        match follow_once(g, client, id, &mut after).await {
            Ok(()) => {}
            Err(e) if e.is::<ApiError>() => return Err(e),
            Err(e) => eprintln!("warning: {e:#}; reconnecting"),
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

async fn follow_once(g: &Global, client: &Client, id: &str, after: &mut u64) -> Result<()> {
    let path = format!("/v1/sessions/{}/events/stream", seg(id));
    let resp = client
        .request(Method::GET, &path)
        .query(&[("after", *after)])
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .context("connecting to the event stream")?;
    let mut body = check(resp).await?.bytes_stream();
    let mut lines = LineBuffer::default();
    let mut sse = SseParser::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the event stream")?;
        for line in lines.push(&chunk)? {
            let Some(event) = sse.line(&line) else {
                continue;
            };
            let record: Value = serde_json::from_str(&event.data).context("parsing an event")?;
            // Only move the cursor forward, so a replayed event is not
            // printed twice after a reconnect.
            match record["seq"].as_u64() {
                Some(seq) if seq <= *after => continue,
                Some(seq) => *after = seq,
                None => {}
            }
            print_event(g, &record)?;
        }
    }
    Ok(())
}

fn print_event(g: &Global, record: &Value) -> Result<()> {
    if g.json {
        // One record per line, so `--json` output is NDJSON.
        return out(serde_json::to_string(record)?);
    }
    out(event_line(record))
}

/// `seq  time  type  details`, the details being the event's other fields.
pub fn event_line(record: &Value) -> String {
    let seq = render::plain(&record["seq"]);
    let time = record["at_ms"]
        .as_i64()
        .map(render::fmt_ms_precise)
        .unwrap_or_else(|| "-".to_owned());
    let event = &record["event"];
    let kind = render::plain(&event["type"]);
    format!("{seq:>6}  {time}  {kind:<20}  {}", details(event))
        .trim_end()
        .to_owned()
}

fn details(event: &Value) -> String {
    let Some(map) = event.as_object() else {
        return String::new();
    };
    map.iter()
        .filter(|(k, _)| k.as_str() != "type")
        .map(|(k, v)| match v {
            Value::Object(_) | Value::Array(_) => format!("{k}={v}"),
            // Durations are fractional ms; a tenth is precision enough.
            Value::Number(n) if n.is_f64() => format!("{k}={:.1}", n.as_f64().unwrap_or(0.0)),
            other => format!("{k}={}", render::plain(other)),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_line_has_seq_time_type_details() {
        let r = json!({"session_id": "s", "seq": 3, "epoch": 1, "at_ms": 1500,
            "event": {"type": "status_changed", "from": "ready", "to": "busy", "ms": 1.26}});
        let line = event_line(&r);
        assert!(line.starts_with("     3  1970-01-01 00:00:01.500  status_changed"));
        assert!(line.ends_with("from=ready ms=1.3 to=busy"), "{line}");
    }

    #[test]
    fn event_line_without_details_has_no_trailing_space() {
        let r = json!({"seq": 1, "at_ms": 0, "event": {"type": "x"}});
        assert!(event_line(&r).ends_with('x'));
    }
}
