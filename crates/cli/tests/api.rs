//! The session API: events, streams, usage, metrics, ownership (T1) and bad
//! input (T27, T28).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;

async fn get(c: &reqwest::Client, url: String, key: &str) -> (u16, String) {
    let r = c.get(url).bearer_auth(key).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_usage_and_metrics_record_a_session() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let c = s.client();
    let id = sid("events");
    for _ in 0..3 {
        assert_eq!(
            invoke(&c, &s, &s.admin_key, "echo", &id, json!({"x": 1}))
                .await
                .status(),
            200
        );
    }
    let stop = c
        .delete(format!("{}/v1/sessions/{id}", s.url))
        .bearer_auth(&s.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    let (st, body) = get(
        &c,
        format!("{}/v1/sessions/{id}/events?after=0", s.url),
        &s.admin_key,
    )
    .await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let evs = v["events"].as_array().unwrap();
    let kinds: Vec<&str> = evs
        .iter()
        .map(|e| e["event"]["type"].as_str().unwrap())
        .collect();
    for k in [
        "created",
        "sandbox_started",
        "invocation_received",
        "invocation_completed",
        "status_changed",
        "usage",
        "terminated",
    ] {
        assert!(kinds.contains(&k), "missing {k} in {kinds:?}");
    }
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "invocation_completed")
            .count(),
        3
    );
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seq must be gapless"
    );
    let started = evs
        .iter()
        .find(|e| e["event"]["type"] == "sandbox_started")
        .unwrap();
    assert_eq!(started["event"]["substrate"], "process");
    assert_eq!(started["event"]["epoch"], 1);
    // Paging from a cursor.
    let (_, body) = get(
        &c,
        format!("{}/v1/sessions/{id}/events?after=3&limit=2", s.url),
        &s.admin_key,
    )
    .await;
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["events"][0]["seq"], 4);
    assert_eq!(page["next"], 5);
    // Usage is summed per session and per agent.
    let (_, body) = get(
        &c,
        format!("{}/v1/usage?group_by=session&session={id}", s.url),
        &s.admin_key,
    )
    .await;
    let u: Value = serde_json::from_str(&body).unwrap();
    let row = &u["usage"][0];
    assert_eq!(row["invocations"], 3);
    assert!(row["cpu_seconds"].as_f64().unwrap() > 0.0, "{row}");
    assert!(
        row["peak_memory_bytes"].as_u64().unwrap() > 1_000_000,
        "{row}"
    );
    assert!(row["active_seconds"].as_f64().unwrap() + row["idle_seconds"].as_f64().unwrap() > 0.0);
    let (_, body) = get(
        &c,
        format!("{}/v1/usage?group_by=agent", s.url),
        &s.admin_key,
    )
    .await;
    assert!(body.contains("\"echo\""), "{body}");
    let m = c
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("berth_invocations_total{status=\"200\"} 3"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_follows_from_a_cursor_without_gaps() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let c = s.client();
    let id = sid("follow");
    assert_eq!(
        invoke(&c, &s, &s.admin_key, "echo", &id, json!({}))
            .await
            .status(),
        200
    );
    let mut stream = c
        .get(format!("{}/v1/sessions/{id}/events/stream?after=2", s.url))
        .bearer_auth(&s.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let (c2, url, key, id2) = (c.clone(), s.url.clone(), s.admin_key.clone(), id.clone());
    let writer = tokio::spawn(async move {
        for _ in 0..5 {
            c2.post(format!("{url}/v1/agents/echo/invocations"))
                .bearer_auth(&key)
                .header(SESSION_HEADER, &id2)
                .body("{}")
                .send()
                .await
                .unwrap();
        }
    });
    let mut text = String::new();
    let mut seqs: Vec<u64> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seqs.iter().filter(|_| true).count() < 14 && tokio::time::Instant::now() < deadline {
        let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await
        else {
            break;
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        seqs = text
            .lines()
            .filter_map(|l| l.strip_prefix("id: ").and_then(|v| v.trim().parse().ok()))
            .collect();
    }
    writer.await.unwrap();
    assert!(seqs.len() >= 10, "got {seqs:?}");
    assert_eq!(seqs[0], 3, "the stream must start right after the cursor");
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the stream skipped an event: {seqs:?}");
    }
}

/// T1: another tenant replays real and guessed ids on every endpoint that
/// takes one; it must never get 2xx or any byte of the owner's data, and
/// foreign and missing must look the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_foreign_sessions_look_missing_everywhere() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let c = s.client();
    let owner = s.create_key("tenant-a", "alice", false);
    let same_tenant = s.create_key("tenant-a", "bob", false);
    let other = s.create_key("tenant-b", "mallory", true);
    // T3: the same user name in another tenant must not match the owner.
    let namesake = s.create_key("tenant-b", "alice", false);
    let real = sid("t1-real");
    let canary = "CANARY-4f1d9e";
    let r = invoke(&c, &s, &owner, "echo", &real, json!({"secret": canary})).await;
    assert_eq!(r.status(), 200);
    let mut requests = 0;
    let missing = sid("t1-missing");
    let mut reference: Option<(u16, String)> = None;
    for round in 0..350 {
        for key in [&other, &same_tenant, &namesake] {
            for id in [&real, &missing] {
                let paths = [
                    ("GET", format!("/v1/sessions/{id}")),
                    ("GET", format!("/v1/sessions/{id}/events?after=0")),
                    ("GET", format!("/v1/sessions/{id}/events/stream?after=0")),
                    ("DELETE", format!("/v1/sessions/{id}")),
                ];
                for (method, path) in paths {
                    let req = c
                        .request(method.parse().unwrap(), format!("{}{path}", s.url))
                        .bearer_auth(key);
                    let resp = tokio::time::timeout(Duration::from_secs(5), req.send())
                        .await
                        .expect("answer in time")
                        .unwrap();
                    let got = (resp.status().as_u16(), resp.text().await.unwrap());
                    requests += 1;
                    assert!(!got.1.contains(canary));
                    assert_eq!(got.0, 404, "{method} {path} -> {got:?}");
                    match &reference {
                        None => reference = Some(got),
                        Some(r) => {
                            assert_eq!(&got, r, "foreign and missing must be indistinguishable")
                        }
                    }
                }
                // Invoking someone else's session id must not reach it.
                if id == &real {
                    let resp = invoke(&c, &s, key, "echo", id, json!({})).await;
                    requests += 1;
                    let got = (resp.status().as_u16(), resp.text().await.unwrap());
                    assert_eq!(got.0, 404, "{got:?}");
                    assert!(!got.1.contains(canary));
                }
            }
            // Usage filtered by the foreign session shows nothing of it.
            let (st, body) = get(&c, format!("{}/v1/usage?session={real}", s.url), key).await;
            requests += 1;
            assert_eq!(st, 200);
            assert!(!body.contains(&real), "usage leaked a foreign session");
        }
        // Guessed ids.
        let guess = format!("{real}{round:x}");
        let (st, _) = get(
            &c,
            format!("{}/v1/sessions/{}", s.url, &guess[..guess.len().min(256)]),
            &other,
        )
        .await;
        requests += 1;
        assert_eq!(st, 404);
    }
    assert!(requests >= 10_000, "{requests}");
    // The owner still has it, untouched.
    let (st, body) = get(&c, format!("{}/v1/sessions/{real}", s.url), &owner).await;
    assert_eq!(st, 200);
    assert!(body.contains("\"invocations\":1"), "{body}");
    // The tenant admin may see it; the other tenant's admin may not (above).
    let tenant_admin = s.create_key("tenant-a", "root", true);
    let (st, _) = get(&c, format!("{}/v1/sessions/{real}", s.url), &tenant_admin).await;
    assert_eq!(st, 200);
    let (st, list) = get(&c, format!("{}/v1/sessions", s.url), &other).await;
    assert_eq!(st, 200);
    assert!(!list.contains(&real));
}

/// Deploys echo with `manifest`, expects a refusal, returns the CLI's output.
fn deploy_refusal(s: &Server, manifest: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples().join("echo"), dir.path());
    std::fs::write(dir.path().join("berth.toml"), manifest).unwrap();
    let out = s.cli().arg("deploy").arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn raw(url: &str, request: &[u8]) -> String {
    let addr = url.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// T27 and T28, and malformed input: a JSON error with a stable code, and
/// berth keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_berth_keeps_serving() {
    let s = Server::start_with("max_body_bytes = 1000000\nheader_timeout_s = 2");
    s.deploy_example("echo", None);
    let c = s.client();
    let key = &s.admin_key;
    // Body of limit + 1 byte.
    let r = c
        .post(format!("{}/v1/agents/echo/invocations", s.url))
        .bearer_auth(key)
        .body(vec![b'a'; 1_000_001])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "payload_too_large"
    );
    // Exactly the limit passes through untouched.
    let r = c
        .post(format!("{}/v1/agents/echo/invocations", s.url))
        .bearer_auth(key)
        .header("content-type", "application/octet-stream")
        .body(vec![b'a'; 1_000_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Headers over 16 KiB.
    let r = c
        .get(format!("{}/v1/sessions", s.url))
        .bearer_auth(key)
        .header("x-big", "b".repeat(17 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    // Invalid session ids, unknown agent, bad query, no key.
    let r = c
        .post(format!("{}/v1/agents/echo/invocations", s.url))
        .bearer_auth(key)
        .header(SESSION_HEADER, "short")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "invalid_session_id"
    );
    let r = c
        .post(format!("{}/v1/agents/nope/invocations", s.url))
        .bearer_auth(key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "not_found");
    let r = c
        .get(format!("{}/v1/sessions?status=sleepy", s.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .get(format!("{}/v1/sessions/{}/events?after=x", s.url, sid("q")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["code"].is_string());
    let r = c
        .get(format!("{}/v1/sessions", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "unauthorized");
    // Unknown manifest fields, and an isolation this server cannot run,
    // are refused at deploy.
    let extra = ["colour = \"blue\"", "isolation = \"microvm\""];
    for (line, expect) in extra.into_iter().zip(["colour", "substrate_unavailable"]) {
        let manifest =
            format!("name = \"echo\"\nentrypoint = [\"python3\", \"main.py\"]\n{line}\n");
        let all = deploy_refusal(&s, &manifest);
        assert!(all.contains(expect), "{all}");
    }
    // T28: CR, LF and NUL in ids and names are rejected, never reflected.
    let url = s.url.clone();
    for bad in ["%0d%0aX-Injected:%201", "abc%00def", "a%0a"] {
        let resp = raw(&url, format!("GET /v1/sessions/{}{bad} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n", "s".repeat(40)).as_bytes());
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(
            !resp.to_ascii_lowercase().contains("\r\nx-injected"),
            "{resp}"
        );
    }
    let resp = raw(&url, format!("POST /v1/agents/echo/invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{SESSION_HEADER}: {}\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}", "a\u{0}b".repeat(15)).as_bytes());
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // Conflicting Content-Length and Transfer-Encoding: hyper frames the
    // body by Transfer-Encoding alone (RFC 9112 6.3) and drops the length,
    // so the 40 bytes the length claims are never taken as the body.
    let resp = raw(&url, format!("POST /v1/agents/echo/invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("\"echo\": \"\""),
        "the body must be the empty chunked body: {resp}"
    );
    // Slow client: a connection that never finishes its head is closed.
    let addr = url.trim_start_matches("http://").to_owned();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "slow connection held open"
    );
    // Still serving.
    let r = invoke(&c, &s, key, "echo", &sid("after"), json!({"ok": true})).await;
    assert_eq!(r.status(), 200);
}

/// Versions are immutable, DEFAULT follows the newest, and agents and
/// versions can be listed, shown and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_default_and_deletion() {
    let s = Server::start();
    let v1 = s.deploy_example("echo", None);
    let v2 = s.deploy_example(
        "echo",
        Some("name = \"echo\"\nentrypoint = [\"python3\", \"main.py\"]\n[env]\nAWS_REGION = \"eu-west-1\"\n"),
    );
    assert_eq!((v1, v2), (1, 2));
    let c = s.client();
    let key = &s.admin_key;
    let region = |v: Value| {
        v["env"]["AWS_REGION"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let r = invoke(&c, &s, key, "echo", &sid("v-default"), json!({})).await;
    assert_eq!(
        region(r.json().await.unwrap()),
        "eu-west-1",
        "DEFAULT must be the newest version"
    );
    let r = c
        .post(format!("{}/v1/agents/echo/invocations?qualifier=1", s.url))
        .bearer_auth(key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(region(r.json().await.unwrap()), "us-east-1");
    let shown = get_json(&c, &s, key, "/v1/agents/echo").await;
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2);
    let out = s
        .cli()
        .args(["agents", "rm", "echo", "--version", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = invoke(&c, &s, key, "echo", &sid("v-after-rm"), json!({})).await;
    assert_eq!(
        region(r.json().await.unwrap()),
        "us-east-1",
        "DEFAULT falls back to version 1"
    );
    let out = s.cli().args(["agents", "ls", "--json"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"echo\""));
    let out = s.cli().args(["agents", "rm", "echo"]).output().unwrap();
    assert!(out.status.success());
    let r = invoke(&c, &s, key, "echo", &sid("v-gone"), json!({})).await;
    assert_eq!(r.status(), 404);
    // Non-admins may not deploy.
    let user = s.create_key("acme", "plain", false);
    let r = c
        .delete(format!("{}/v1/agents/echo", s.url))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}
