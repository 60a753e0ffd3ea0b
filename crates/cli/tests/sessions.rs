//! End to end: real binary, real sandboxes, real agents.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_share_a_sandbox_and_sessions_never_do() {
    let s = Server::start();
    s.deploy_example("counter", None);
    let c = s.client();
    let a = sid("counter-a");
    let b = sid("counter-b");
    let mut pids = Vec::new();
    for want in 1..=3 {
        let r: Value = invoke(&c, &s, &s.admin_key, "counter", &a, json!({}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            r["count"], want,
            "turn {want} of one session must see the previous turns"
        );
        pids.push(r["pid"].clone());
    }
    let rb: Value = invoke(&c, &s, &s.admin_key, "counter", &b, json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rb["count"], 1, "a second session must get its own sandbox");
    // Stop a, then use it again: a fresh, empty sandbox.
    let stop = c
        .delete(format!("{}/v1/sessions/{a}", s.url))
        .bearer_auth(&s.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    let rec: Value = stop.json().await.unwrap();
    assert_eq!(rec["status"], "terminated");
    assert_eq!(rec["termination_reason"], "stopped");
    let again: Value = invoke(&c, &s, &s.admin_key, "counter", &a, json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        again["count"], 1,
        "after termination the session must start empty"
    );
    let rec: Value = get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{a}")).await;
    assert_eq!(rec["epoch"], 2);
    assert_eq!(rec["activations"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sees_the_contract_headers_and_environment() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let c = s.client();
    let id = sid("echo-contract");
    let r = c
        .post(format!("{}/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fecho/invocations?qualifier=DEFAULT", s.url))
        .bearer_auth(&s.admin_key)
        .header(SESSION_HEADER, &id)
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .header("x-not-allowed", "secret")
        .header("x-amzn-bedrock-agentcore-runtime-custom-thing", "yes")
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[SESSION_HEADER], id.as_str());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["echo"]["prompt"], "hi");
    assert_eq!(v["session_id"], id.as_str());
    assert!(v["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(v["env"]["DOCKER_CONTAINER"], "1");
    assert_eq!(v["env"]["AWS_REGION"], "us-east-1");
    let h = &v["headers"];
    assert!(h["traceparent"].is_string());
    assert_eq!(h["x-amzn-bedrock-agentcore-runtime-custom-thing"], "yes");
    assert!(
        h.get("x-not-allowed").is_none(),
        "headers outside the allowlist must not reach the agent"
    );
    assert!(
        h.get("authorization").is_none(),
        "Authorization reaches the agent only when allowed"
    );

    // Without a session id one is generated, valid, and echoed.
    let r = c
        .post(format!("{}/v1/agents/echo/invocations", s.url))
        .bearer_auth(&s.admin_key)
        .body("plain text")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let gen = r.headers()[SESSION_HEADER].to_str().unwrap().to_owned();
    assert!((33..=256).contains(&gen.len()));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["session_id"], gen.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_is_relayed_before_the_agent_finishes() {
    let s = Server::start();
    s.deploy_example("streamer", None);
    let c = s.client();
    let id = sid("stream");
    let start = Instant::now();
    let mut r = invoke(
        &c,
        &s,
        &s.admin_key,
        "streamer",
        &id,
        json!({"n": 5, "delay": 0.4}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let first = r.chunk().await.unwrap().expect("a first chunk");
    let first_at = start.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    let mut rest = Vec::new();
    while let Some(ch) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&ch);
    }
    let total = start.elapsed();
    assert!(String::from_utf8_lossy(&rest).contains("\"done\""));
    // The agent spends 5 x 0.4 s between events: a buffered relay would
    // deliver the first chunk only at the end.
    assert!(
        total - first_at >= Duration::from_millis(1200),
        "first chunk at {first_at:?}, end at {total:?}: the stream was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_agent_gives_424_and_next_request_gets_a_fresh_sandbox() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let c = s.client();
    let id = sid("crash");
    let ok = invoke(&c, &s, &s.admin_key, "echo", &id, json!({})).await;
    assert_eq!(ok.status(), 200);
    let pid1: Value = ok.json().await.unwrap();
    let r = invoke(&c, &s, &s.admin_key, "echo", &id, json!({"crash": true})).await;
    assert_eq!(r.status(), 424);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "agent_unreachable");
    wait_for(
        "the crashed session to terminate",
        Duration::from_secs(20),
        || async {
            let v: Value = get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{id}")).await;
            v["status"] == "terminated"
        },
    )
    .await;
    let again = invoke(&c, &s, &s.admin_key, "echo", &id, json!({})).await;
    assert_eq!(again.status(), 200);
    let pid2: Value = again.json().await.unwrap();
    assert_eq!(pid2["session_id"], pid1["session_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_turns_run_in_order_and_overflow_gets_429() {
    let s = Server::start_with("queue_depth = 3");
    s.deploy_example("counter", None);
    let c = s.client();
    let id = sid("queue");
    // Warm the session so every request below goes to one live sandbox.
    invoke(&c, &s, &s.admin_key, "counter", &id, json!({})).await;
    let mut handles = Vec::new();
    for _ in 0..12 {
        let (c, url, key, id) = (c.clone(), s.url.clone(), s.admin_key.clone(), id.clone());
        handles.push(tokio::spawn(async move {
            let r = c
                .post(format!("{url}/v1/agents/counter/invocations"))
                .bearer_auth(key)
                .header(SESSION_HEADER, id)
                .json(&json!({"sleep": 0.3}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (status, v)
        }));
    }
    let mut counts = Vec::new();
    let mut throttled = 0;
    for h in handles {
        let (status, v) = h.await.unwrap();
        match status {
            200 => counts.push(v["count"].as_u64().unwrap()),
            429 => {
                assert_eq!(v["code"], "session_queue_full");
                throttled += 1;
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    counts.sort();
    let expect: Vec<u64> = (2..2 + counts.len() as u64).collect();
    assert_eq!(
        counts, expect,
        "turns of one session must run one at a time, none lost"
    );
    assert!(
        throttled > 0,
        "12 concurrent requests with a queue of 3 must overflow"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_reaped_with_a_recorded_reason() {
    let s = Server::start();
    let manifest = "name = \"echo\"\nentrypoint = [\"python3\", \"main.py\"]\n[lifecycle]\nidle_timeout_s = 1\nmax_lifetime_s = 3\n";
    s.deploy_example("echo", Some(manifest));
    let c = s.client();
    let idle = sid("idle");
    assert_eq!(
        invoke(&c, &s, &s.admin_key, "echo", &idle, json!({}))
            .await
            .status(),
        200
    );
    wait_for("idle termination", Duration::from_secs(15), || async {
        let v: Value = get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{idle}")).await;
        v["status"] == "terminated" && v["termination_reason"] == "idle_timeout"
    })
    .await;
    // A session kept busy with requests still ends at its max lifetime.
    let busy = sid("lifetime");
    let t0 = Instant::now();
    let mut reason = Value::Null;
    while t0.elapsed() < Duration::from_secs(15) {
        invoke(&c, &s, &s.admin_key, "echo", &busy, json!({"sleep": 0.2})).await;
        let v: Value = get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{busy}")).await;
        if v["activations"].as_u64() > Some(1) || v["termination_reason"] == "max_lifetime" {
            reason = json!("max_lifetime");
            break;
        }
    }
    assert_eq!(
        reason, "max_lifetime",
        "a busy session must still end at its max lifetime"
    );
    let events: Value =
        get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{busy}/events")).await;
    let reasons: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"]["type"] == "terminated")
        .map(|e| &e["event"]["reason"])
        .collect();
    assert!(reasons.iter().any(|r| *r == "max_lifetime"), "{reasons:?}");
}

/// The `bedrock-agentcore` SDK agent, installed from PyPI at deploy time,
/// runs unmodified and answers with the session id berth gave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentcore_sdk_agent_runs_unmodified() {
    let s = Server::start();
    s.deploy_example("agentcore-sdk", None);
    let c = s.client();
    let id = sid("sdk");
    let r = c
        .post(format!(
            "{}/runtimes/agentcore-sdk/invocations?qualifier=DEFAULT",
            s.url
        ))
        .bearer_auth(&s.admin_key)
        .header(SESSION_HEADER, &id)
        .json(&json!({"prompt": "berth"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"], "Hello berth");
    assert_eq!(v["session_id"], id.as_str());
    // AgentCore's StopRuntimeSession stops it at once; a second stop is 404.
    let stop = |qualifier: &'static str| {
        c.post(format!(
            "{}/runtimes/agentcore-sdk/stopruntimesession{qualifier}",
            s.url
        ))
        .bearer_auth(&s.admin_key)
        .header(SESSION_HEADER, &id)
        .send()
    };
    assert_eq!(stop("?qualifier=DEFAULT").await.unwrap().status(), 200);
    assert_eq!(stop("").await.unwrap().status(), 404);
}

/// `HealthyBusy` keeps a session alive past its idle timeout (background
/// work); an agent whose status never changes does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_busy_holds_off_the_idle_reaper() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let main = r#"
import json, os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BUSY_UNTIL = time.time() + 4.0
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def reply(self, obj):
        b = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self):
        busy = time.time() < BUSY_UNTIL
        self.reply({"status": "HealthyBusy" if busy else "Healthy", "time_of_last_update": 1000})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.reply({"ok": True})
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"#;
    std::fs::write(dir.path().join("main.py"), main).unwrap();
    std::fs::write(
        dir.path().join("berth.toml"),
        "name = \"busy\"\nentrypoint = [\"python3\", \"main.py\"]\n[lifecycle]\nidle_timeout_s = 1\n",
    )
    .unwrap();
    let out = s.cli().arg("deploy").arg(dir.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = s.client();
    let id = sid("busy");
    assert_eq!(
        invoke(&c, &s, &s.admin_key, "busy", &id, json!({}))
            .await
            .status(),
        200
    );
    // Busy for 4 s with a 1 s idle timeout: still alive at 2.5 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let v = get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{id}")).await;
    assert_eq!(
        v["status"], "active",
        "HealthyBusy must keep the session alive: {v}"
    );
    // Then Healthy with a time_of_last_update that never changes: reaped.
    wait_for(
        "idle termination after the busy period",
        Duration::from_secs(15),
        || async {
            let v = get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{id}")).await;
            v["termination_reason"] == "idle_timeout"
        },
    )
    .await;
}
