//! The audit log, end to end: refused credentials, denied accesses and
//! admin actions are recorded with who, what and why; `GET /v1/audit` and
//! `berth audit` show them, each admin only its own tenant's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// `berth audit --offline --json` on the server's data dir.
fn offline(s: &Server, action: &str) -> Vec<Value> {
    let out = s
        .cli()
        .args([
            "audit",
            "--offline",
            "--json",
            "--action",
            action,
            "--data-dir",
        ])
        .arg(&s.data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "berth audit --offline: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["events"].as_array().unwrap().clone()
}

/// Waits until an event of `action` matching `pred` is stored (appends
/// run after the response) and returns it.
async fn wait_offline(s: &Server, action: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_for(action, Duration::from_secs(10), || {
        found = offline(s, action).into_iter().find(|e| pred(e));
        let done = found.is_some();
        async move { done }
    })
    .await;
    found.unwrap()
}

async fn api_events(c: &reqwest::Client, s: &Server, key: &str) -> Vec<Value> {
    let v = get_json(c, s, key, "/v1/audit").await;
    v["events"].as_array().expect("events").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_denials_and_admin_actions_are_audited() {
    let s = Server::start();
    let c = s.client();

    // A bad key: refused, recorded without a principal; the key itself
    // never reaches the log.
    let r = c
        .get(format!("{}/v1/sessions", s.url))
        .bearer_auth("berth_0000_not-a-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e = wait_offline(&s, "auth.refused", |e| e["target"] == "/v1/sessions").await;
    assert_eq!(e["outcome"], "denied");
    assert_eq!(e["reason"], "unknown api key");
    assert!(e["tenant"].is_null() && e["user"].is_null());
    assert!(!e.to_string().contains("not-a-key"));

    // A non-admin's deploy and delete: denied, with the user and target.
    let bob = s.create_key("acme", "bob", false);
    let r = c
        .post(format!("{}/v1/agents", s.url))
        .bearer_auth(&bob)
        .body("not an archive")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .delete(format!("{}/v1/agents/echo", s.url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let e = wait_offline(&s, "access.denied", |e| e["target"] == "echo").await;
    assert_eq!((&e["tenant"], &e["user"]), (&json!("acme"), &json!("bob")));
    assert_eq!(e["outcome"], "denied");
    let e = wait_offline(&s, "access.denied", |e| e["target"] == "agent deploy").await;
    assert_eq!(e["user"], "bob");

    // An admin deploy: the admin, the agent and its version.
    let v = s.deploy_example("echo", None);
    let e = wait_offline(&s, "agent.deploy", |_| true).await;
    assert_eq!(
        (&e["tenant"], &e["user"]),
        (&json!("acme"), &json!("admin"))
    );
    assert_eq!(e["target"], format!("echo@{v}"));
    assert_eq!(e["outcome"], "allowed");

    // Bob stopping his own session is no admin action; the admin stopping
    // it is.
    let mine = sid("audit-own");
    let r = invoke(&c, &s, &bob, "echo", &mine, json!({"prompt": "hi"})).await;
    assert_eq!(r.status(), 200);
    let r = c
        .delete(format!("{}/v1/sessions/{mine}", s.url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let theirs = sid("audit-theirs");
    let r = invoke(&c, &s, &bob, "echo", &theirs, json!({"prompt": "hi"})).await;
    assert_eq!(r.status(), 200);
    let r = c
        .delete(format!("{}/v1/sessions/{theirs}", s.url))
        .bearer_auth(&s.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e = wait_offline(&s, "session.stop", |e| e["target"] == theirs.as_str()).await;
    assert_eq!(
        (&e["tenant"], &e["user"]),
        (&json!("acme"), &json!("admin"))
    );
    assert_eq!(e["outcome"], "allowed");
    let stops = offline(&s, "session.stop");
    assert!(
        stops.iter().all(|e| e["target"] != mine.as_str()),
        "an owner stopping its own session is not audited: {stops:#?}"
    );

    // The table form works too.
    let out = s
        .cli()
        .args(["audit", "--offline", "--data-dir"])
        .arg(&s.data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("acme/bob") && text.contains("access.denied"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_admin_sees_only_its_tenant() {
    let s = Server::start();
    let c = s.client();
    let other_admin = s.create_key("other", "root", true);
    let other_user = s.create_key("other", "eve", false);
    let acme_user = s.create_key("acme", "bob", false);
    for key in [&acme_user, &other_user] {
        let r = c
            .delete(format!("{}/v1/agents/echo", s.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    let r = c
        .get(format!("{}/v1/audit", s.url))
        .bearer_auth("berth_0000_bad")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    wait_offline(&s, "access.denied", |e| e["user"] == "eve").await;
    wait_offline(&s, "access.denied", |e| e["user"] == "bob").await;
    wait_offline(&s, "auth.refused", |_| true).await;

    let acme = api_events(&c, &s, &s.admin_key).await;
    assert!(acme.iter().any(|e| e["user"] == "bob"), "{acme:#?}");
    assert!(acme.iter().all(|e| e["tenant"] == "acme"), "{acme:#?}");
    let other = api_events(&c, &s, &other_admin).await;
    assert!(other.iter().any(|e| e["user"] == "eve"), "{other:#?}");
    assert!(other.iter().all(|e| e["tenant"] == "other"), "{other:#?}");

    // Filters and the cursor.
    let first = acme[0]["id"].as_u64().unwrap();
    let v = get_json(&c, &s, &s.admin_key, &format!("/v1/audit?after={first}")).await;
    let after = v["events"].as_array().unwrap();
    assert!(after.iter().all(|e| e["id"].as_u64().unwrap() > first));
    let v = get_json(&c, &s, &s.admin_key, "/v1/audit?action=agent.deploy").await;
    assert_eq!(v["events"], json!([]));

    // A non-admin may not read the audit log, and trying is audited.
    let r = c
        .get(format!("{}/v1/audit", s.url))
        .bearer_auth(&acme_user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let e = wait_offline(&s, "access.denied", |e| e["target"] == "/v1/audit").await;
    assert_eq!(e["user"], "bob");

    // `berth audit` over the API, as the acme admin.
    let out = s
        .cli()
        .args(["audit", "--json", "--action", "access.denied"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let events = v["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["user"] == "bob"));
    assert!(events.iter().all(|e| e["tenant"] == "acme"));
}
