//! SigV4 with an unmodified AWS SDK: boto3's `bedrock-agentcore` client,
//! pointed at berth with `endpoint_url`, signing with the pair that
//! `berth keys create` printed. Plus T30's SigV4 part: stale, altered and
//! replayed signed requests are refused with 401 and leave no session.
//!
//! Needs a Python with boto3: `$BERTH_TEST_BOTO3_PYTHON`, else the venv that
//! `scripts/test` makes at /var/cache/berth-ci/pyvenv.

mod common;

use common::{sid, Server, SESSION_HEADER};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARN: &str = "arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/echo";
const DEFAULT_PYTHON: &str = "/var/cache/berth-ci/pyvenv/bin/python";

/// The Python that has boto3; fails the test, with what to do, if none.
fn python() -> PathBuf {
    let py = std::env::var_os("BERTH_TEST_BOTO3_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PYTHON));
    let ok = Command::new(&py)
        .args(["-c", "import boto3"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "boto3 is not importable with {}: run scripts/test (it makes the venv) or set \
         BERTH_TEST_BOTO3_PYTHON to a python that has boto3",
        py.display()
    );
    py
}

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sigv4/client.py")
}

/// The principal's bearer key and SigV4 pair from `berth keys create --json`.
struct Pair {
    bearer: String,
    akid: String,
    secret: String,
}

fn create_pair(s: &Server) -> Pair {
    let out = Command::new(common::berth_bin())
        .args([
            "keys",
            "create",
            "--tenant",
            "t1",
            "--user",
            "u1",
            "--json",
            "--data-dir",
        ])
        .arg(&s.data)
        .output()
        .expect("run berth keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("keys json");
    let field = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("no {k} in {v}"))
            .to_owned()
    };
    let pair = Pair {
        bearer: field("key"),
        akid: field("access_key_id"),
        secret: field("secret_access_key"),
    };
    assert_eq!(pair.akid, format!("BKIA{}", field("id").to_uppercase()));
    pair
}

/// Runs one scenario of the boto3 helper and parses its JSON line.
fn boto3(scenario: &str, s: &Server, akid: &str, secret: &str, session: &str) -> Value {
    let out = Command::new(python())
        .arg(helper())
        .args([scenario, &s.url, akid, secret, ARN, session])
        .output()
        .expect("run the boto3 helper");
    assert!(
        out.status.success(),
        "boto3 helper {scenario} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "helper output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Sends a request that botocore signed, optionally with another body.
async fn send_raw(c: &reqwest::Client, signed: &Value, body: Option<&str>) -> reqwest::Response {
    let mut req = c.post(signed["url"].as_str().expect("url"));
    for (k, v) in signed["headers"].as_object().expect("headers") {
        req = req.header(k.as_str(), v.as_str().expect("header value"));
    }
    let body = body.or(signed["body"].as_str()).expect("body").to_owned();
    req.body(body).send().await.expect("send signed request")
}

async fn session_exists(c: &reqwest::Client, s: &Server, key: &str, id: &str) -> bool {
    let r = c
        .get(format!("{}/v1/sessions/{id}", s.url))
        .bearer_auth(key)
        .send()
        .await
        .expect("GET session");
    match r.status().as_u16() {
        200 => true,
        404 => false,
        other => panic!("GET /v1/sessions/{id}: unexpected {other}"),
    }
}

/// How many invocations the session's log records.
async fn invocations(c: &reqwest::Client, s: &Server, key: &str, id: &str) -> usize {
    let v = common::get_json(c, s, key, &format!("/v1/sessions/{id}/events?after=0")).await;
    let events = v["events"].as_array().expect("events");
    events
        .iter()
        .filter(|e| e.to_string().contains("\"invocation_received\""))
        .count()
}

#[tokio::test]
async fn boto3_invokes_and_stops_with_a_berth_issued_pair() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let pair = create_pair(&s);
    let session = sid("sigv4-boto3");

    let v = boto3("flow", &s, &pair.akid, &pair.secret, &session);
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["session"], session.as_str(), "{v}");
    let echoed: Value = serde_json::from_str(v["body"].as_str().expect("body")).expect("echo json");
    assert!(
        echoed.to_string().contains("\"prompt\":\"hi\""),
        "echo lost the payload: {echoed}"
    );
    assert_eq!(v["stop"]["status"], 200, "{v}");
    assert_eq!(v["second_stop"]["status"], 404, "{v}");

    // The SigV4 principal is the bearer key's: it sees the session it made.
    let c = s.client();
    assert!(session_exists(&c, &s, &pair.bearer, &session).await);
}

#[tokio::test]
async fn a_wrong_secret_gets_401_and_creates_nothing() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let pair = create_pair(&s);
    let session = sid("sigv4-wrong");
    let mut wrong = pair.secret.clone();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(wrong.len() - 1.., last);

    let v = boto3("invoke", &s, &pair.akid, &wrong, &session);
    assert_eq!(v["status"], 401, "{v}");
    let v = boto3("invoke", &s, "BKIA000000000000", &pair.secret, &session);
    assert_eq!(v["status"], 401, "{v}");
    assert!(!session_exists(&s.client(), &s, &pair.bearer, &session).await);
}

/// T30, SigV4 part: a signature made with a clock 10 minutes slow, a body
/// altered after signing, and a replayed request are all refused with 401,
/// and none of them creates a session.
#[tokio::test]
async fn stale_altered_and_replayed_requests_are_refused() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let pair = create_pair(&s);
    let c = s.client();

    let stale_sid = sid("sigv4-stale");
    let stale = boto3("signed-stale", &s, &pair.akid, &pair.secret, &stale_sid);
    assert_eq!(send_raw(&c, &stale, None).await.status(), 401);
    assert!(!session_exists(&c, &s, &pair.bearer, &stale_sid).await);

    let altered_sid = sid("sigv4-altered");
    let signed = boto3("signed", &s, &pair.akid, &pair.secret, &altered_sid);
    let r = send_raw(&c, &signed, Some(r#"{"prompt":"ho"}"#)).await;
    assert_eq!(r.status(), 401);
    assert!(!session_exists(&c, &s, &pair.bearer, &altered_sid).await);

    // The same request, unaltered, is accepted once and refused after.
    let replay_sid = sid("sigv4-replay");
    let signed = boto3("signed", &s, &pair.akid, &pair.secret, &replay_sid);
    let first = send_raw(&c, &signed, None).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some(replay_sid.as_str())
    );
    let _ = first.bytes().await;
    let before = invocations(&c, &s, &pair.bearer, &replay_sid).await;
    assert_eq!(before, 1);
    assert_eq!(send_raw(&c, &signed, None).await.status(), 401);
    assert_eq!(
        invocations(&c, &s, &pair.bearer, &replay_sid).await,
        before,
        "the replay reached the session"
    );
}
