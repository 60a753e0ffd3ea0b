//! Relay: requests reach the agent and responses stream back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use berth_sandbox::Driver;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

#[tokio::test]
async fn echo_round_trip() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let sb = env.driver.start(spec("relay", app.path())).await.unwrap();
    assert!(sb.start_time() < Duration::from_secs(5));
    wait_healthy(&sb).await;
    let (status, bytes) = call(&sb, "POST", "/invocations", r#"{"prompt":"hi"}"#).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["echo"], r#"{"prompt":"hi"}"#);
    assert_eq!(v["headers"]["content-type"], "application/json");
    let status = sb.guest_status().await.unwrap();
    assert!(status.running);
    sb.terminate(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn sse_streams_chunk_by_chunk() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let sb = env.driver.start(spec("sse", app.path())).await.unwrap();
    wait_healthy(&sb).await;
    let req = Request::get("/stream").body(body("")).unwrap();
    let resp = sb.request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut events: Vec<(f64, f64)> = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let received = now_secs();
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                let json: serde_json::Value =
                    serde_json::from_str(event.trim().trim_start_matches("data: ")).unwrap();
                events.push((json["t"].as_f64().unwrap(), received));
            }
        }
    }
    assert_eq!(events.len(), 5);
    let first_received = events[0].1;
    let last_sent = events[4].0;
    assert!(
        first_received < last_sent,
        "first chunk arrived at {first_received}, after the last was sent at {last_sent}: buffered"
    );
    sb.terminate(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn unreachable_agent_gives_502_json() {
    init_tracing();
    let env = env();
    let app = app("import time\ntime.sleep(60)\n");
    let sb = env.driver.start(spec("noport", app.path())).await.unwrap();
    let (status, bytes) = call(&sb, "POST", "/invocations", "{}").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["code"], "agent_unreachable");
    let reserved = Request::post("/_berth/shutdown").body(body("")).unwrap();
    assert!(matches!(
        sb.request(reserved).await,
        Err(berth_sandbox::DriverError::ReservedPath(_))
    ));
    let t = Instant::now();
    sb.terminate(Duration::from_millis(500)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(3));
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
