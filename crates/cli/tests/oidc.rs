//! OIDC bearer JWTs end to end: a real issuer (discovery + JWKS over HTTP on
//! 127.0.0.1:0) with keys made here, the real binary, real sandboxes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const AUD: &str = "berth";

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// A signing key with its kid, its public JWK and (for RSA) the public key
/// PEM an attacker would have.
struct Key {
    kid: String,
    alg: Algorithm,
    enc: EncodingKey,
    jwk: Value,
    public_pem: Vec<u8>,
}

fn rsa_key(kid: &str) -> Key {
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let public = private.to_public_key();
    Key {
        kid: kid.into(),
        alg: Algorithm::RS256,
        enc: EncodingKey::from_rsa_der(private.to_pkcs1_der().unwrap().as_bytes()),
        jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                    "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())}),
        public_pem: public
            .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
            .unwrap()
            .into_bytes(),
    }
}

fn ed25519_key(kid: &str) -> Key {
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let public = Ed25519KeyPair::from_pkcs8(doc.as_ref())
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec();
    Key {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        enc: EncodingKey::from_ed_der(doc.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(&public)}),
        public_pem: public,
    }
}

/// RSA keygen is slow in a debug build: make the three keys side by side.
fn rsa_keys() -> (Key, Key, Key) {
    let spawn = |kid: &'static str| std::thread::spawn(move || rsa_key(kid));
    let (a, b, c) = (spawn("rsa-1"), spawn("rsa-2"), spawn("mallory"));
    (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
}

/// A discovery document and a JWKS served on 127.0.0.1:0; the JWKS can be
/// swapped while it runs.
struct Issuer {
    url: String,
    jwks: Arc<Mutex<Value>>,
}

impl Issuer {
    async fn start(keys: &[&Key]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let jwks = Arc::new(Mutex::new(Value::Null));
        let discovery = json!({"issuer": url, "jwks_uri": format!("{url}/keys")});
        let served = jwks.clone();
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || async move { axum::Json(discovery) }),
            )
            .route(
                "/keys",
                axum::routing::get(
                    move || async move { axum::Json(served.lock().unwrap().clone()) },
                ),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let issuer = Self { url, jwks };
        issuer.publish(keys);
        issuer
    }

    fn publish(&self, keys: &[&Key]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
        *self.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    fn config(&self) -> String {
        format!(
            "[oidc]\nissuer = \"{}\"\naudiences = [\"{AUD}\"]\nallowed_clients = [\"web\"]\n\
             required_scopes = [\"agents:invoke\"]\njwks_min_refetch_s = 1\n",
            self.url
        )
    }

    /// Claims of a valid token for `tenant`/`user`.
    fn claims(&self, tenant: &str, user: &str) -> Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        json!({
            "iss": self.url, "aud": AUD, "azp": "web", "scope": "openid agents:invoke",
            "sub": user, "tenant": tenant, "iat": now, "exp": now + 300,
        })
    }
}

fn sign(key: &Key, claims: &Value) -> String {
    sign_as(key, &key.kid, claims)
}

fn sign_as(key: &Key, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(key.alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, &key.enc).unwrap()
}

/// `claims` changed by `edit`.
fn edited(claims: &Value, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut c = claims.clone();
    edit(c.as_object_mut().unwrap());
    c
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn list_ids(c: &reqwest::Client, s: &Server, key: &str) -> Vec<String> {
    let v = get_json(c, s, key, "/v1/sessions").await;
    v["sessions"]
        .as_array()
        .expect("sessions array")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_tokens_authenticate_and_forgeries_never_do() {
    let (rsa1, rsa2, mallory) = tokio::task::spawn_blocking(rsa_keys).await.unwrap();
    let ed = ed25519_key("ed-1");
    let issuer = Issuer::start(&[&rsa1, &ed]).await;
    let s = Server::start_with(&issuer.config());
    s.deploy_example("echo", None);
    let c = s.client();

    // A valid RS256 token of acme/alice and a valid EdDSA token of globex/bob.
    let alice = sign(&rsa1, &issuer.claims("acme", "alice"));
    let bob = sign(&ed, &issuer.claims("globex", "bob"));
    let (sa, sb) = (sid("oidc-alice"), sid("oidc-bob"));
    for (token, session) in [(&alice, &sa), (&bob, &sb)] {
        let r = invoke(&c, &s, token, "echo", session, json!({"hi": 1})).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    assert_eq!(list_ids(&c, &s, &alice).await, vec![sa.clone()]);
    assert_eq!(list_ids(&c, &s, &bob).await, vec![sb.clone()]);
    let rec = get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{sa}")).await;
    assert_eq!(
        (rec["tenant"].as_str(), rec["user"].as_str()),
        (Some("acme"), Some("alice"))
    );
    let other = c
        .get(format!("{}/v1/sessions/{sa}", s.url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        404,
        "another tenant must not see the session"
    );

    // T30: every forgery gets the same 401 and leaves nothing behind.
    let good = issuer.claims("acme", "alice");
    let now = now_s();
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})
            .to_string()
            .as_bytes()),
        b64(good.to_string().as_bytes())
    );
    let hs256 = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        jsonwebtoken::encode(&h, &good, &EncodingKey::from_secret(&rsa1.public_pem)).unwrap()
    };
    let altered = {
        let t = sign(&rsa1, &good);
        let parts: Vec<&str> = t.split('.').collect();
        let admin = edited(&good, |c| _ = c.insert("roles".into(), json!(["admin"])));
        format!(
            "{}.{}.{}",
            parts[0],
            b64(admin.to_string().as_bytes()),
            parts[2]
        )
    };
    let forged: Vec<(&str, String)> = vec![
        (
            "expired",
            sign(
                &rsa1,
                &edited(&good, |c| {
                    c.insert("iat".into(), json!(now - 7200));
                    c.insert("exp".into(), json!(now - 3600));
                }),
            ),
        ),
        (
            "not yet valid",
            sign(
                &rsa1,
                &edited(&good, |c| _ = c.insert("nbf".into(), json!(now + 3600))),
            ),
        ),
        (
            "wrong audience",
            sign(
                &ed,
                &edited(&good, |c| _ = c.insert("aud".into(), json!("elsewhere"))),
            ),
        ),
        (
            "wrong issuer",
            sign(
                &rsa1,
                &edited(&good, |c| {
                    _ = c.insert("iss".into(), json!("http://127.0.0.1:1"))
                }),
            ),
        ),
        ("alg=none", none),
        ("HS256 keyed with the public key", hs256),
        (
            "re-signed by an unknown key",
            sign_as(&mallory, "rsa-1", &good),
        ),
        ("unknown kid", sign(&mallory, &good)),
        ("payload altered after signing", altered),
        (
            "missing tenant claim",
            sign(&rsa1, &edited(&good, |c| _ = c.remove("tenant"))),
        ),
        (
            "disallowed client",
            sign(
                &rsa1,
                &edited(&good, |c| _ = c.insert("azp".into(), json!("cli"))),
            ),
        ),
        (
            "missing scope",
            sign(
                &ed,
                &edited(&good, |c| _ = c.insert("scope".into(), json!("openid"))),
            ),
        ),
    ];
    let reference = invoke(&c, &s, "not-a-token", "echo", &sid("oidc-ref"), json!({})).await;
    assert_eq!(reference.status(), 401);
    let reference = reference.text().await.unwrap();
    let mut refused = Vec::new();
    for (what, token) in &forged {
        let session = sid("oidc-forged");
        let r = invoke(&c, &s, token, "echo", &session, json!({"hi": 1})).await;
        assert_eq!(r.status(), 401, "{what} must be refused");
        assert_eq!(
            r.text().await.unwrap(),
            reference,
            "{what}: the 401 must not tell why"
        );
        let listed = c
            .get(format!("{}/v1/sessions", s.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(listed.status(), 401, "{what} must not list sessions");
        refused.push(session);
    }

    // Rotation: the issuer swaps rsa-1 for rsa-2. berth learns rsa-2 from
    // the first token that names it, and from then on rsa-1 is gone.
    issuer.publish(&[&rsa2, &ed]);
    let new = sign(&rsa2, &issuer.claims("acme", "alice"));
    let rotated = sid("oidc-rotated");
    wait_for(
        "a token of the new key to be accepted",
        Duration::from_secs(15),
        || {
            let (c, s, new, rotated) = (&c, &s, &new, &rotated);
            async move { invoke(c, s, new, "echo", rotated, json!({})).await.status() == 200 }
        },
    )
    .await;
    let old = sign(&rsa1, &issuer.claims("acme", "alice"));
    let session = sid("oidc-old-key");
    let r = invoke(&c, &s, &old, "echo", &session, json!({})).await;
    assert_eq!(
        r.status(),
        401,
        "a token of the removed key must be refused"
    );
    assert_eq!(r.text().await.unwrap(), reference);
    refused.push(session);
    let r = invoke(&c, &s, &bob, "echo", &sb, json!({})).await;
    assert_eq!(r.status(), 200, "the key that stayed must still work");

    // No refused attempt made a session (so no sandbox either).
    let all = list_ids(&c, &s, &s.admin_key).await;
    assert!(all.contains(&sa) && all.contains(&rotated));
    for session in &refused {
        assert!(
            !all.contains(session),
            "a refused token made session {session}"
        );
        let r = c
            .get(format!("{}/v1/sessions/{session}", s.url))
            .bearer_auth(&s.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
}
