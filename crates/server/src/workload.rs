//! Workload tokens: the short-lived credential an activation's agent gets in
//! the `WorkloadAccessToken` header of every request, so that the agent's
//! tools can prove whom they act for.
//!
//! A token is a JWT (compact JWS, `alg` EdDSA, `kid` in the header) signed
//! with one of berth's own Ed25519 keys. Its claims name the tenant, user,
//! agent, session and epoch (activation) it was minted for. Anyone can fetch
//! the public keys at `GET /.well-known/jwks.json`; an authenticated caller
//! can ask berth itself at `POST /v1/workload/verify`, which also refuses a
//! token whose session has ended or moved on to a later activation, so
//! tokens die with the session even before they expire.
//!
//! Keys live in `<data_dir>/workload-keys/<kid>.key` (0600, the 32-byte seed
//! in hex), so tokens survive a restart. The newest key signs; the one
//! before it still verifies. A key older than the rotation period is
//! replaced at start-up and by a once-a-minute check; since the period is
//! at least the token ttl, every unexpired token's key is still kept.

use crate::auth::Auth;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use berth_core::{AgentName, SessionId, SessionStatus, TenantId, UserId};
use berth_log::{SessionLog, SessionRecord};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The `iss` of every workload token.
pub const ISSUER: &str = "berth";
/// The `aud` of every workload token.
pub const AUDIENCE: &str = "berth-workload";
/// Longest token `verify` looks at; a real one is about 600 bytes.
const MAX_TOKEN_BYTES: usize = 4096;
/// Keys kept: the signing one and its predecessor.
const KEEP_KEYS: usize = 2;
/// A token issued this far in the future is refused (clock skew allowance).
const MAX_IAT_SKEW_S: u64 = 60;
/// How often the rotation task checks the signing key's age.
const ROTATION_CHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot use workload key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("workload key file {path} does not hold a 32-byte Ed25519 seed in hex")]
    BadKeyFile { path: PathBuf },
}

/// Why a token does not verify. The `Display` text is the `reason` callers
/// of the verify endpoint see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("the token is not a well-formed compact JWS")]
    Malformed,
    #[error("the token's algorithm is not EdDSA")]
    Algorithm,
    #[error("the token's key id is not one of berth's keys")]
    UnknownKey,
    #[error("the token's signature does not match")]
    Signature,
    #[error("the token's claims are malformed")]
    Claims,
    #[error("the token was not issued by berth")]
    Issuer,
    #[error("the token is not a workload token")]
    Audience,
    #[error("the token has expired")]
    Expired,
    #[error("the token was issued in the future")]
    NotYetValid,
    #[error("the session named in the token has ended")]
    SessionEnded,
}

/// What a workload token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// `{tenant}/{user}`.
    pub sub: String,
    pub tenant: TenantId,
    pub user: UserId,
    pub agent: AgentName,
    pub session: SessionId,
    pub epoch: u64,
    /// Unix seconds.
    pub iat: u64,
    /// Unix seconds; `iat` plus the configured ttl.
    pub exp: u64,
    pub jti: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    kid: String,
    #[serde(default)]
    typ: Option<String>,
}

/// One Ed25519 key with its encoded JWS header, computed once.
struct Key {
    kid: String,
    created_s: u64,
    signing: SigningKey,
    header_b64: String,
}

impl Key {
    fn new(kid: String, created_s: u64, signing: SigningKey) -> Self {
        let header = Header {
            alg: "EdDSA".into(),
            kid: kid.clone(),
            typ: Some("JWT".into()),
        };
        // A struct of three strings always serializes.
        let json = serde_json::to_vec(&header).unwrap_or_default();
        Self {
            kid,
            created_s,
            signing,
            header_b64: URL_SAFE_NO_PAD.encode(json),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
            "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(self.signing.verifying_key().as_bytes()),
        })
    }
}

/// Mints and verifies workload tokens with berth's own keys.
pub struct WorkloadTokenService {
    dir: PathBuf,
    ttl_s: u64,
    rotation_s: u64,
    /// Newest first; at most `KEEP_KEYS`.
    keys: RwLock<Vec<Arc<Key>>>,
}

fn now_s() -> u64 {
    (berth_core::now_ms().max(0) / 1000) as u64
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorkloadError + '_ {
    move |source| WorkloadError::Io {
        path: path.to_owned(),
        source,
    }
}

impl WorkloadTokenService {
    /// Loads the keys in `dir` (creating it), and makes a new signing key
    /// when there is none or the newest is older than `rotation_s`.
    pub fn open(dir: &Path, ttl_s: u64, rotation_s: u64) -> Result<Arc<Self>, WorkloadError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir))?;
        let svc = Self {
            dir: dir.to_owned(),
            ttl_s,
            rotation_s,
            keys: RwLock::new(load_keys(dir)?),
        };
        svc.rotate_if_due(now_s())?;
        Ok(Arc::new(svc))
    }

    /// Checks the signing key's age once a minute for as long as the
    /// service lives.
    pub fn spawn_rotation(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ROTATION_CHECK);
            loop {
                tick.tick().await;
                let Some(svc) = weak.upgrade() else { return };
                if let Err(e) = svc.rotate_if_due(now_s()) {
                    tracing::error!(error = %e, "workload key rotation failed");
                }
            }
        });
    }

    /// Makes a new signing key when the newest is `rotation_s` old, and
    /// forgets (and deletes) keys past the kept two. Rare and tiny, so the
    /// file IO runs inline.
    pub fn rotate_if_due(&self, now: u64) -> Result<bool, WorkloadError> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let due = keys
            .first()
            .is_none_or(|k| now >= k.created_s.saturating_add(self.rotation_s));
        if due {
            let key = new_key(&self.dir, now)?;
            tracing::info!(kid = %key.kid, "new workload signing key");
            keys.insert(0, Arc::new(key));
        }
        let keep = KEEP_KEYS.min(keys.len());
        for old in keys.drain(keep..) {
            let path = key_path(&self.dir, &old.kid);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(error = %e, path = %path.display(), "cannot delete old workload key");
            }
        }
        Ok(due)
    }

    /// The key id that signs new tokens.
    pub fn current_kid(&self) -> String {
        self.current().map(|k| k.kid.clone()).unwrap_or_default()
    }

    fn current(&self) -> Option<Arc<Key>> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.first().cloned()
    }

    /// The public keys, as a JWK set.
    pub fn jwks(&self) -> serde_json::Value {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
    }

    /// Claims for an activation, issued at `now`.
    pub fn claims(
        &self,
        tenant: &TenantId,
        user: &UserId,
        agent: &AgentName,
        session: &SessionId,
        epoch: u64,
        now: u64,
    ) -> Claims {
        let mut jti = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut jti);
        Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: format!("{tenant}/{user}"),
            tenant: tenant.clone(),
            user: user.clone(),
            agent: agent.clone(),
            session: session.clone(),
            epoch,
            iat: now,
            exp: now.saturating_add(self.ttl_s),
            jti: hex::encode(jti),
        }
    }

    /// Signs `claims` with the current key.
    pub fn sign(&self, claims: &Claims) -> Option<String> {
        let key = self.current()?;
        let payload = serde_json::to_vec(claims).ok()?;
        let mut out = String::with_capacity(key.header_b64.len() + payload.len() * 4 / 3 + 92);
        out.push_str(&key.header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let sig = key.signing.sign(out.as_bytes());
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.to_bytes(), &mut out);
        Some(out)
    }

    /// Checks a token's form, signature, issuer, audience and times. Whether
    /// its session is still live is `check_session`'s business.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, Invalid> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Invalid::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Invalid::Malformed);
        };
        let header: Header = decode_json(h).ok_or(Invalid::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(Invalid::Algorithm);
        }
        let key = self.key(&header.kid).ok_or(Invalid::UnknownKey)?;
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| Invalid::Malformed)?;
        let sig = Signature::from_slice(&sig).map_err(|_| Invalid::Malformed)?;
        let signed = &token[..h.len() + 1 + p.len()];
        key.verify_strict(signed.as_bytes(), &sig)
            .map_err(|_| Invalid::Signature)?;
        let claims: Claims = decode_json(p).ok_or(Invalid::Claims)?;
        check_claims(&claims, now)?;
        Ok(claims)
    }

    fn key(&self, kid: &str) -> Option<VerifyingKey> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .find(|k| k.kid == kid)
            .map(|k| k.signing.verifying_key())
    }
}

impl berth_session::WorkloadTokens for WorkloadTokenService {
    fn mint(
        &self,
        tenant: &TenantId,
        user: &UserId,
        agent: &AgentName,
        session: &SessionId,
        epoch: u64,
    ) -> Option<String> {
        self.sign(&self.claims(tenant, user, agent, session, epoch, now_s()))
    }
}

fn check_claims(c: &Claims, now: u64) -> Result<(), Invalid> {
    if c.iss != ISSUER {
        return Err(Invalid::Issuer);
    }
    if c.aud != AUDIENCE {
        return Err(Invalid::Audience);
    }
    if c.sub != format!("{}/{}", c.tenant, c.user) {
        return Err(Invalid::Claims);
    }
    if now >= c.exp {
        return Err(Invalid::Expired);
    }
    if c.iat > now.saturating_add(MAX_IAT_SKEW_S) {
        return Err(Invalid::NotYetValid);
    }
    Ok(())
}

/// A token is only good while the activation it names is live: same
/// session, same epoch, not terminated, same owner and agent.
pub fn check_session(c: &Claims, rec: Option<&SessionRecord>) -> Result<(), Invalid> {
    let live = rec.is_some_and(|r| {
        r.epoch == c.epoch
            && r.status != SessionStatus::Terminated
            && r.tenant == c.tenant
            && r.user == c.user
            && r.agent == c.agent
    });
    if live {
        Ok(())
    } else {
        Err(Invalid::SessionEnded)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn key_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join(format!("{kid}.key"))
}

/// Key ids are `<created unix seconds>-<8 hex>`; only such files are keys.
fn parse_kid(kid: &str) -> Option<u64> {
    let (created, tag) = kid.split_once('-')?;
    if tag.len() != 8 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    created.parse().ok()
}

fn load_keys(dir: &Path) -> Result<Vec<Arc<Key>>, WorkloadError> {
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().is_none_or(|e| e != "key") {
            continue;
        }
        let Some(kid) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let Some(created_s) = parse_kid(kid) else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| WorkloadError::BadKeyFile { path: path.clone() })?;
        let key = Key::new(kid.to_owned(), created_s, SigningKey::from_bytes(&seed));
        keys.push(Arc::new(key));
    }
    keys.sort_by(|a, b| (b.created_s, &b.kid).cmp(&(a.created_s, &a.kid)));
    Ok(keys)
}

/// Makes a key from the OS's randomness and writes it (0600, atomically).
fn new_key(dir: &Path, now: u64) -> Result<Key, WorkloadError> {
    use rand::rngs::OsRng;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let mut tag = [0u8; 4];
    OsRng.fill_bytes(&mut tag);
    let kid = format!("{now}-{}", hex::encode(tag));
    let path = key_path(dir, &kid);
    let tmp = dir.join(format!("{kid}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(hex::encode(seed).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(Key::new(kid, now, SigningKey::from_bytes(&seed)))
}

/// `GET /.well-known/jwks.json`: berth's public workload keys. No
/// authentication: they are public by nature.
pub async fn jwks(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(s.workload.jwks())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub token: String,
}

/// `POST /v1/workload/verify` with `{"token": "..."}`, for any
/// authenticated caller. A token that does not verify, for whatever reason,
/// is a 200 `{"valid": false, "reason": ...}`; only a body that is not that
/// JSON object is a 4xx.
pub async fn verify(
    State(s): State<AppState>,
    Auth(_who): Auth,
    Json(req): Json<VerifyRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let claims = match s.workload.verify(&req.token, now_s()) {
        Ok(c) => c,
        Err(why) => return Ok(invalid(why)),
    };
    let rec = s
        .store
        .session(&claims.session)
        .await
        .map_err(ApiError::internal)?;
    Ok(match check_session(&claims, rec.as_ref()) {
        Ok(()) => Json(serde_json::json!({"valid": true, "claims": claims})),
        Err(why) => invalid(why),
    })
}

fn invalid(why: Invalid) -> Json<serde_json::Value> {
    Json(serde_json::json!({"valid": false, "reason": why.to_string()}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const TTL: u64 = 900;
    const ROTATION: u64 = 86_400;

    fn ids() -> (TenantId, UserId, AgentName, SessionId) {
        (
            TenantId::parse("acme").unwrap(),
            UserId::parse("alice").unwrap(),
            AgentName::parse("echo").unwrap(),
            SessionId::parse("s-0123456789abcdef0123456789abcdef").unwrap(),
        )
    }

    fn svc() -> (tempfile::TempDir, Arc<WorkloadTokenService>) {
        let dir = tempfile::tempdir().unwrap();
        let s = WorkloadTokenService::open(&dir.path().join("k"), TTL, ROTATION).unwrap();
        (dir, s)
    }

    fn mint_at(s: &WorkloadTokenService, now: u64) -> String {
        let (t, u, a, id) = ids();
        s.sign(&s.claims(&t, &u, &a, &id, 3, now)).unwrap()
    }

    fn b64json(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn part(token: &str, i: usize) -> serde_json::Value {
        let p = token.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_name_the_activation() {
        let (_d, s) = svc();
        let tok = mint_at(&s, 1000);
        let c = s.verify(&tok, 1001).unwrap();
        let (t, u, a, id) = ids();
        assert_eq!((c.tenant, c.user, c.agent, c.session), (t, u, a, id));
        assert_eq!((c.epoch, c.iat, c.exp), (3, 1000, 1000 + TTL));
        assert_eq!(
            (c.iss.as_str(), c.aud.as_str(), c.sub.as_str()),
            (ISSUER, AUDIENCE, "acme/alice")
        );
        let h = part(&tok, 0);
        assert_eq!(h["alg"], "EdDSA");
        assert_eq!(h["kid"], s.current_kid());
        assert_ne!(part(&tok, 1)["jti"], part(&mint_at(&s, 1000), 1)["jti"]);
    }

    #[test]
    fn expired_and_future_tokens_are_refused() {
        let (_d, s) = svc();
        let tok = mint_at(&s, 1000);
        assert_eq!(s.verify(&tok, 1000 + TTL), Err(Invalid::Expired));
        assert_eq!(
            s.verify(&tok, 1000 - MAX_IAT_SKEW_S - 1),
            Err(Invalid::NotYetValid)
        );
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let (_d, s) = svc();
        let tok = mint_at(&s, 1000);
        let mut claims = part(&tok, 1);
        claims["user"] = "mallory".into();
        claims["sub"] = "acme/mallory".into();
        let parts: Vec<&str> = tok.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], b64json(&claims), parts[2]);
        assert_eq!(s.verify(&forged, 1001), Err(Invalid::Signature));
    }

    #[test]
    fn another_keys_signature_under_our_kid_fails() {
        let (_d, s) = svc();
        let (_d2, other) = svc();
        let tok = mint_at(&other, 1000);
        assert_eq!(s.verify(&tok, 1001), Err(Invalid::UnknownKey));
        // Same token, but claiming to be signed by our key.
        let mut h = part(&tok, 0);
        h["kid"] = s.current_kid().into();
        let parts: Vec<&str> = tok.split('.').collect();
        let head = b64json(&h);
        let resigned_input = format!("{head}.{}", parts[1]);
        let sig = other
            .current()
            .unwrap()
            .signing
            .sign(resigned_input.as_bytes());
        let forged = format!(
            "{resigned_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.to_bytes())
        );
        assert_eq!(s.verify(&forged, 1001), Err(Invalid::Signature));
    }

    #[test]
    fn wrong_algorithm_issuer_audience_and_form_are_refused() {
        let (_d, s) = svc();
        let tok = mint_at(&s, 1000);
        let parts: Vec<&str> = tok.split('.').collect();
        let none = b64json(&serde_json::json!({"alg": "none", "kid": s.current_kid()}));
        assert_eq!(
            s.verify(&format!("{none}.{}.", parts[1]), 1001),
            Err(Invalid::Algorithm)
        );
        let (t, u, a, id) = ids();
        let mut c = s.claims(&t, &u, &a, &id, 1, 1000);
        c.iss = "elsewhere".into();
        assert_eq!(s.verify(&s.sign(&c).unwrap(), 1001), Err(Invalid::Issuer));
        c.iss = ISSUER.into();
        c.aud = "other".into();
        assert_eq!(s.verify(&s.sign(&c).unwrap(), 1001), Err(Invalid::Audience));
        for bad in ["", "a.b", "a.b.c.d", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
            assert_eq!(s.verify(bad, 1001), Err(Invalid::Malformed), "{bad:.20}");
        }
        assert_eq!(s.verify(&format!("{tok}x"), 1001), Err(Invalid::Malformed));
    }

    #[test]
    fn keys_persist_with_0600_and_rotation_keeps_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("k");
        let s = WorkloadTokenService::open(&kdir, TTL, ROTATION).unwrap();
        let kid = s.current_kid();
        let meta = std::fs::metadata(key_path(&kdir, &kid)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&kdir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let created = parse_kid(&kid).unwrap();
        let tok = mint_at(&s, created);

        let reopened = WorkloadTokenService::open(&kdir, TTL, ROTATION).unwrap();
        assert_eq!(reopened.current_kid(), kid);
        assert!(reopened.verify(&tok, created + 1).is_ok());

        assert!(!reopened.rotate_if_due(created + ROTATION - 1).unwrap());
        assert!(reopened.rotate_if_due(created + ROTATION).unwrap());
        assert_ne!(reopened.current_kid(), kid);
        assert!(
            reopened.verify(&tok, created + 1).is_ok(),
            "previous key verifies"
        );
        assert_eq!(reopened.jwks()["keys"].as_array().unwrap().len(), 2);

        assert!(reopened.rotate_if_due(created + 3 * ROTATION).unwrap());
        assert_eq!(reopened.verify(&tok, created + 1), Err(Invalid::UnknownKey));
        let files = std::fs::read_dir(&kdir).unwrap().count();
        assert_eq!(files, KEEP_KEYS, "the oldest key file is deleted");
    }

    #[test]
    fn jwks_lists_okp_keys() {
        let (_d, s) = svc();
        let jwks = s.jwks();
        let k = &jwks["keys"][0];
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str()),
            (Some("OKP"), Some("Ed25519"))
        );
        assert_eq!(k["kid"], s.current_kid());
        let x = URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap()).unwrap();
        assert_eq!(x, s.current().unwrap().signing.verifying_key().as_bytes());
    }

    #[test]
    fn a_token_dies_with_its_activation() {
        let (_d, s) = svc();
        let c = s.verify(&mint_at(&s, 1000), 1001).unwrap();
        let rec = |status, epoch| SessionRecord {
            id: c.session.clone(),
            agent: c.agent.clone(),
            tenant: c.tenant.clone(),
            user: c.user.clone(),
            status,
            epoch,
            activations: epoch,
            agent_version: None,
            substrate: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            last_seq: 0,
            termination_reason: None,
            usage: Default::default(),
            invocations: 0,
        };
        assert_eq!(
            check_session(&c, Some(&rec(SessionStatus::Idle, 3))),
            Ok(())
        );
        let ended = Err(Invalid::SessionEnded);
        assert_eq!(
            check_session(&c, Some(&rec(SessionStatus::Terminated, 3))),
            ended
        );
        assert_eq!(
            check_session(&c, Some(&rec(SessionStatus::Active, 4))),
            ended
        );
        assert_eq!(check_session(&c, None), ended);
        let mut other = rec(SessionStatus::Idle, 3);
        other.user = UserId::parse("bob").unwrap();
        assert_eq!(check_session(&c, Some(&other)), ended);
    }
}
