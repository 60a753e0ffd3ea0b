//! Workload tokens: every request to an agent carries a berth-signed token
//! in `WorkloadAccessToken` naming its activation; the token verifies at
//! berth while the activation lives and never otherwise; it is never in the
//! sandbox's environment or files; a caller cannot supply its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use berth_server::workload::WorkloadTokenService;
use common::*;
use serde_json::{json, Value};

const TOKEN_HEADER: &str = "workloadaccesstoken";

/// An agent that reports where, besides its request header, its token can
/// be found: environment variables, files under /app and /tmp, and the
/// environ and cmdline of every process it can see. `plant` writes a
/// marker file first, so the test can check that the search finds things.
const SNIFFER: &str = r#"
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def places(needles):
    hits = {n: [] for n in needles}
    def look(where, data):
        for n in needles:
            if n.encode() in data:
                hits[n].append(where)
    for k, v in os.environ.items():
        look("env:" + k, (k + "=" + v).encode())
    scanned = 0
    for root in ("/app", "/tmp"):
        for d, _, files in os.walk(root):
            for f in files:
                p = os.path.join(d, f)
                try:
                    with open(p, "rb") as fh:
                        look(p, fh.read(16 << 20))
                    scanned += 1
                except OSError:
                    pass
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for part in ("environ", "cmdline"):
                try:
                    with open(f"/proc/{pid}/{part}", "rb") as fh:
                        look(f"/proc/{pid}/{part}", fh.read())
                except OSError:
                    pass
    return hits, scanned

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def send_json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.send_json({"status": "Healthy", "time_of_last_update": 0})
    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if payload.get("plant"):
            with open("/tmp/planted", "w") as fh:
                fh.write(payload["plant"])
        token = self.headers.get("WorkloadAccessToken") or ""
        needles = [n for n in [token, *payload.get("needles", [])] if n]
        hits, scanned = places(needles)
        self.send_json({"token": token, "hits": hits, "scanned": scanned})

host = "0.0.0.0" if os.environ.get("DOCKER_CONTAINER") == "1" else "127.0.0.1"
ThreadingHTTPServer((host, 8080), H).serve_forever()
"#;

fn b64url_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = A.iter().position(|&a| a == c).expect("base64url digit") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn b64url_encode(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let mut b = [0u8; 3];
        b[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn jws_part(token: &str, i: usize) -> Value {
    serde_json::from_slice(&b64url_decode(token.split('.').nth(i).unwrap())).unwrap()
}

async fn verify(c: &reqwest::Client, s: &Server, key: &str, token: &str) -> Value {
    let r = c
        .post(format!("{}/v1/workload/verify", s.url))
        .bearer_auth(key)
        .json(&json!({ "token": token }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Invokes echo and returns the token it received.
async fn echoed_token(c: &reqwest::Client, s: &Server, key: &str, id: &str) -> String {
    let r = c
        .post(format!("{}/v1/agents/echo/invocations", s.url))
        .bearer_auth(key)
        .header(SESSION_HEADER, id)
        .header("WorkloadAccessToken", "caller-made-this-up")
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let headers = v["headers"].as_object().unwrap();
    assert!(
        !headers
            .values()
            .any(|h| h.as_str().unwrap().contains("caller-made-this-up")),
        "a caller's WorkloadAccessToken must never reach the agent: {headers:?}"
    );
    headers[TOKEN_HEADER].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_a_token_that_verifies_while_their_activation_lives() {
    let mut s = Server::start();
    s.deploy_example("echo", None);
    let alice = s.create_key("acme", "alice", false);
    let c = s.client();
    let id = sid("workload");

    let token = echoed_token(&c, &s, &alice, &id).await;
    let session = get_json(&c, &s, &alice, &format!("/v1/sessions/{id}")).await;
    let epoch = session["epoch"].as_u64().unwrap();
    // Any authenticated principal may verify; the claims name the activation.
    let v = verify(&c, &s, &s.admin_key, &token).await;
    assert_eq!(v["valid"], true, "{v}");
    let cl = &v["claims"];
    assert_eq!(cl["iss"], "berth");
    assert_eq!(cl["aud"], "berth-workload");
    assert_eq!(cl["sub"], "acme/alice");
    assert_eq!(
        (
            &cl["tenant"],
            &cl["user"],
            &cl["agent"],
            &cl["session"],
            &cl["epoch"]
        ),
        (
            &json!("acme"),
            &json!("alice"),
            &json!("echo"),
            &json!(id),
            &json!(epoch)
        )
    );
    assert_eq!(
        cl["exp"].as_u64().unwrap(),
        cl["iat"].as_u64().unwrap() + 900
    );

    // Unauthenticated callers get 401; a body that is not {"token": ...} a 4xx.
    let r = c
        .post(format!("{}/v1/workload/verify", s.url))
        .json(&json!({ "token": token }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{}/v1/workload/verify", s.url))
        .bearer_auth(&alice)
        .json(&json!({ "tok": token }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());

    // The JWKS is public and lists the kid that signed the token.
    let kid = jws_part(&token, 0)["kid"].as_str().unwrap().to_owned();
    let jwks: Value = c
        .get(format!("{}/.well-known/jwks.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    let jwk = keys
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("kid in JWKS");
    assert_eq!(
        (&jwk["kty"], &jwk["crv"]),
        (&json!("OKP"), &json!("Ed25519"))
    );

    // A tampered claim breaks the signature.
    let mut claims = jws_part(&token, 1);
    claims["user"] = "mallory".into();
    claims["sub"] = "acme/mallory".into();
    let parts: Vec<&str> = token.split('.').collect();
    let payload = b64url_encode(&serde_json::to_vec(&claims).unwrap());
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    let v = verify(&c, &s, &alice, &tampered).await;
    assert_eq!(v["valid"], false, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("signature"), "{v}");

    // The same claims signed by another Ed25519 key under berth's kid.
    let other = tempfile::tempdir().unwrap();
    let forger = WorkloadTokenService::open(other.path(), 900, 86_400).unwrap();
    let forger_kid = forger.current_kid();
    std::fs::rename(
        other.path().join(format!("{forger_kid}.key")),
        other.path().join(format!("{kid}.key")),
    )
    .unwrap();
    let forger = WorkloadTokenService::open(other.path(), 900, 86_400).unwrap();
    assert_eq!(forger.current_kid(), kid);
    let claims: berth_server::workload::Claims =
        serde_json::from_value(jws_part(&token, 1)).unwrap();
    let forged = forger.sign(&claims).unwrap();
    let v = verify(&c, &s, &alice, &forged).await;
    assert_eq!(v["valid"], false, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("signature"), "{v}");

    // Stopping the session kills the token; the next activation's token
    // names the new epoch, and the old one stays dead.
    let stop = c
        .delete(format!("{}/v1/sessions/{id}", s.url))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    let v = verify(&c, &s, &alice, &token).await;
    assert_eq!(v["valid"], false, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("session"), "{v}");
    let next = echoed_token(&c, &s, &alice, &id).await;
    let v = verify(&c, &s, &alice, &next).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["claims"]["epoch"].as_u64().unwrap(), epoch + 1);
    assert_eq!(verify(&c, &s, &alice, &token).await["valid"], false);

    // Keys survive a restart: the same kid is still published and signs.
    s.terminate();
    s.boot();
    let c = s.client();
    let jwks = get_json(&c, &s, &alice, "/.well-known/jwks.json").await;
    assert!(jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == kid.as_str()));
    let key_file = s.data.join("workload-keys").join(format!("{kid}.key"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let after = echoed_token(&c, &s, &alice, &sid("workload-restart")).await;
    assert_eq!(jws_part(&after, 0)["kid"], kid.as_str());
    assert_eq!(verify(&c, &s, &alice, &after).await["valid"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_never_in_the_sandbox_environment_or_files() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("berth.toml"),
        "name = \"sniffer\"\nentrypoint = [\"python3\", \"main.py\"]\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("main.py"), SNIFFER).unwrap();
    let out = s
        .cli()
        .args(["deploy", "--json"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = s.client();
    let id = sid("sniff");

    let plant = format!("planted-marker-{}", uuid_like());
    let r = invoke(
        &c,
        &s,
        &s.admin_key,
        "sniffer",
        &id,
        json!({"plant": plant, "needles": [plant]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let first: Value = r.json().await.unwrap();
    let token = first["token"].as_str().unwrap().to_owned();
    assert!(token.len() > 100, "the agent got a token: {first}");
    assert_eq!(verify(&c, &s, &s.admin_key, &token).await["valid"], true);
    // The search works: it finds the marker the agent planted.
    assert_eq!(first["hits"][&plant], json!(["/tmp/planted"]), "{first}");
    assert!(first["scanned"].as_u64().unwrap() >= 2, "{first}");
    assert_eq!(first["hits"][&token], json!([]), "token leaked: {first}");

    // A later turn gets a fresh token; neither it nor the first one has
    // been left anywhere in the sandbox.
    let r = invoke(
        &c,
        &s,
        &s.admin_key,
        "sniffer",
        &id,
        json!({"needles": [token]}),
    )
    .await;
    let second: Value = r.json().await.unwrap();
    let token2 = second["token"].as_str().unwrap();
    assert_ne!(token2, token);
    assert_eq!(second["hits"][&token], json!([]), "token leaked: {second}");
    assert_eq!(second["hits"][token2], json!([]), "token leaked: {second}");
}
