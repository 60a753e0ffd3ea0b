//! Bearer JWTs of an OIDC issuer.
//!
//! A token is accepted when, in this order:
//! 1. it is at most `max_token_bytes` long and is a three-part JWS;
//! 2. its header's `alg` is RS256, ES256 or EdDSA (never `none`, never HS*)
//!    and names a `kid` found in the issuer's JWKS, and that key's type
//!    (and `alg`, when the JWK has one) matches the header's `alg`;
//! 3. the signature verifies with that key;
//! 4. `exp` is present and not past, `nbf` and `iat` are not in the future,
//!    each within `clock_skew_s`; `iss` equals `issuer` exactly; `aud`
//!    names one of `audiences`; the client (`azp` or `client_id`) is
//!    allowed; every required scope is granted;
//! 5. the tenant and user claims are valid ids.
//!
//! Keys come from the `jwks_uri` of the issuer's discovery document and are
//! cached. The cache is refreshed when it is older than `jwks_refresh_s`,
//! and when a token names a `kid` the cache does not hold (that is how key
//! rotation reaches berth); refreshes happen at most once per
//! `jwks_min_refetch_s`, so tokens with made-up kids cannot make berth
//! hammer the issuer. A failed refresh keeps the last good key set.
//!
//! The fetches use berth's HTTP client, which is built without TLS, so the
//! discovery URL and `jwks_uri` must be plain `http://` (an issuer on
//! loopback or behind a local TLS-terminating proxy).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use berth_core::{Principal, Role, TenantId, UserId};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// The largest clock skew the config may allow.
pub const MAX_CLOCK_SKEW_S: u64 = 300;

/// The `[oidc]` section of the config. Each field's doc gives its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer (`iss`) tokens must name, compared exactly. Required.
    pub issuer: String,
    /// Where the discovery document is (default
    /// `{issuer}/.well-known/openid-configuration`). Must be `http://`:
    /// berth's HTTP client has no TLS.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Accepted audiences; a token's `aud` must name at least one. Required,
    /// non-empty.
    pub audiences: Vec<String>,
    /// When non-empty, the token's `azp` (or else `client_id`) must be one
    /// of these (default: empty, any client).
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Scopes a token must all carry, in its space-separated `scope` claim
    /// or its `scp` claim (an array or a space-separated string) (default:
    /// empty, none required).
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// The claim that gives the tenant id (default "tenant").
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim that gives the user id (default "sub").
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// The claim holding the caller's roles, an array of strings (default
    /// "roles"). Absent means no roles.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The value in `roles_claim` that grants berth's admin role (default
    /// "admin").
    #[serde(default = "default_admin_role")]
    pub admin_role: String,
    /// Allowed clock difference for `exp`, `nbf` and `iat`, in seconds
    /// (default 60, at most 300).
    #[serde(default = "default_clock_skew_s")]
    pub clock_skew_s: u64,
    /// Refresh the cached JWKS when it is older than this, in seconds
    /// (default 300).
    #[serde(default = "default_jwks_refresh_s")]
    pub jwks_refresh_s: u64,
    /// At most one JWKS fetch per this many seconds, whatever triggers it
    /// (an unknown `kid` or an old cache) (default 10, at least 1).
    #[serde(default = "default_jwks_min_refetch_s")]
    pub jwks_min_refetch_s: u64,
    /// Tokens longer than this are refused unread (default 8192).
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// The largest discovery document or JWKS berth reads (default 65536).
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: usize,
    /// Keys past this many in a JWKS are ignored (default 32).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Time limit for each discovery or JWKS request, in seconds (default 5).
    #[serde(default = "default_fetch_timeout_s")]
    pub fetch_timeout_s: u64,
}

fn default_tenant_claim() -> String {
    "tenant".into()
}
fn default_user_claim() -> String {
    "sub".into()
}
fn default_roles_claim() -> String {
    "roles".into()
}
fn default_admin_role() -> String {
    "admin".into()
}
fn default_clock_skew_s() -> u64 {
    60
}
fn default_jwks_refresh_s() -> u64 {
    300
}
fn default_jwks_min_refetch_s() -> u64 {
    10
}
fn default_max_token_bytes() -> usize {
    8192
}
fn default_max_document_bytes() -> usize {
    64 * 1024
}
fn default_max_keys() -> usize {
    32
}
fn default_fetch_timeout_s() -> u64 {
    5
}

/// Why a token (or the `[oidc]` config) was refused. One variant per cause;
/// `reason()` gives the audit log a short stable string for each.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the [oidc] config has no audiences")]
    NoAudience,
    #[error("the [oidc] clock_skew_s is {0}, more than the {MAX_CLOCK_SKEW_S} allowed")]
    SkewTooLarge(u64),
    #[error("the [oidc] setting {0} must be at least 1")]
    ZeroLimit(&'static str),
    #[error("could not build the HTTP client for the OIDC issuer")]
    HttpClient(#[source] reqwest::Error),
    #[error("the token is longer than the configured maximum")]
    TooLarge,
    #[error("the token is not a well-formed JWS")]
    Malformed,
    #[error("the token's header has a `crit` parameter berth does not understand")]
    CriticalHeader,
    #[error("the token's alg is not RS256, ES256 or EdDSA")]
    UnsupportedAlg,
    #[error("the token's header has no kid")]
    MissingKid,
    #[error("the token's kid is not in the issuer's key set")]
    UnknownKey,
    #[error("the issuer's key set could not be fetched")]
    KeysUnavailable,
    #[error("the token's alg does not match its key")]
    AlgMismatch,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has no exp claim")]
    MissingExpiry,
    #[error("the token's {0} claim is not a number")]
    BadTimeClaim(&'static str),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token names another issuer")]
    WrongIssuer,
    #[error("the token names none of the accepted audiences")]
    WrongAudience,
    #[error("the token's client is not allowed")]
    ClientNotAllowed,
    #[error("the token lacks a required scope")]
    MissingScope,
    #[error("the token has no tenant claim")]
    MissingTenant,
    #[error("the token's tenant claim is not a valid tenant id")]
    InvalidTenant,
    #[error("the token has no user claim")]
    MissingUser,
    #[error("the token's user claim is not a valid user id")]
    InvalidUser,
    #[error("the token's roles claim is not an array of strings")]
    InvalidRoles,
}

impl OidcError {
    /// A short, stable reason for the audit log.
    pub fn reason(&self) -> &'static str {
        use OidcError::*;
        match self {
            NoAudience | SkewTooLarge(_) | ZeroLimit(_) | HttpClient(_) => "invalid oidc config",
            TooLarge => "token too large",
            Malformed => "malformed token",
            CriticalHeader => "unsupported critical header",
            UnsupportedAlg => "unsupported alg",
            MissingKid => "missing kid",
            UnknownKey => "unknown key",
            KeysUnavailable => "issuer keys unavailable",
            AlgMismatch => "alg does not match key",
            BadSignature => "bad signature",
            MissingExpiry => "missing exp",
            BadTimeClaim(_) => "malformed time claim",
            Expired => "expired token",
            NotYetValid => "token not yet valid",
            WrongIssuer => "wrong issuer",
            WrongAudience => "wrong audience",
            ClientNotAllowed => "client not allowed",
            MissingScope => "missing scope",
            MissingTenant => "missing tenant claim",
            InvalidTenant => "invalid tenant claim",
            MissingUser => "missing user claim",
            InvalidUser => "invalid user claim",
            InvalidRoles => "invalid roles claim",
        }
    }
}

/// Why the discovery document or the JWKS could not be had. Logged, never
/// shown to callers: they see `KeysUnavailable` or `UnknownKey`.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("answered with status {0}")]
    Status(u16),
    #[error("document is larger than {0} bytes")]
    TooLarge(usize),
    #[error("document is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("discovery names issuer {0:?}, not the configured one")]
    IssuerMismatch(String),
    #[error("the JWKS has no usable signing key")]
    NoUsableKeys,
}

/// One verification key, with the only alg it may verify.
struct Key {
    alg: Algorithm,
    decoding: DecodingKey,
}

/// A fetched JWKS, by kid.
struct KeySet {
    keys: HashMap<String, Key>,
    fetched_at: Instant,
}

/// Validates tokens of one issuer.
pub struct OidcVerifier {
    cfg: OidcConfig,
    discovery_url: String,
    http: reqwest::Client,
    /// The last good key set; read on every request, replaced on refresh.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held while refreshing, so concurrent requests make one fetch; holds
    /// when the last fetch was tried, for the rate limit.
    refresh: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<Value>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<Value>,
}

impl OidcVerifier {
    /// Checks the config and builds the HTTP client; nothing is fetched
    /// until the first token arrives.
    pub fn new(cfg: OidcConfig) -> Result<Self, OidcError> {
        if cfg.audiences.iter().all(|a| a.is_empty()) {
            return Err(OidcError::NoAudience);
        }
        if cfg.clock_skew_s > MAX_CLOCK_SKEW_S {
            return Err(OidcError::SkewTooLarge(cfg.clock_skew_s));
        }
        for (name, v) in [
            ("jwks_refresh_s", cfg.jwks_refresh_s as usize),
            ("jwks_min_refetch_s", cfg.jwks_min_refetch_s as usize),
            ("max_token_bytes", cfg.max_token_bytes),
            ("max_document_bytes", cfg.max_document_bytes),
            ("max_keys", cfg.max_keys),
            ("fetch_timeout_s", cfg.fetch_timeout_s as usize),
        ] {
            if v == 0 {
                return Err(OidcError::ZeroLimit(name));
            }
        }
        let discovery_url = cfg.discovery_url.clone().unwrap_or_else(|| {
            format!(
                "{}/.well-known/openid-configuration",
                cfg.issuer.trim_end_matches('/')
            )
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.fetch_timeout_s))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(OidcError::HttpClient)?;
        Ok(Self {
            cfg,
            discovery_url,
            http,
            keys: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(None),
        })
    }

    /// The principal a token stands for, or why it was refused.
    pub async fn verify(&self, token: &str) -> Result<Principal, OidcError> {
        let now_s = berth_core::now_ms() / 1000;
        self.verify_at(token, now_s).await
    }

    async fn verify_at(&self, token: &str, now_s: i64) -> Result<Principal, OidcError> {
        if token.len() > self.cfg.max_token_bytes {
            return Err(OidcError::TooLarge);
        }
        let (alg, kid) = parse_header(token)?;
        let keys = self.keys_for(&kid).await?;
        let key = keys.keys.get(&kid).ok_or(OidcError::UnknownKey)?;
        if key.alg != alg {
            return Err(OidcError::AlgMismatch);
        }
        let claims = verify_signature(token, key)?;
        self.principal(&claims, now_s)
    }

    /// Checks every claim of a token whose signature has verified.
    fn principal(&self, claims: &Map<String, Value>, now_s: i64) -> Result<Principal, OidcError> {
        self.check_times(claims, now_s)?;
        self.check_parties(claims)?;
        let tenant = match claims.get(&self.cfg.tenant_claim) {
            None | Some(Value::Null) => return Err(OidcError::MissingTenant),
            Some(Value::String(s)) => TenantId::parse(s).map_err(|_| OidcError::InvalidTenant)?,
            Some(_) => return Err(OidcError::InvalidTenant),
        };
        let user = match claims.get(&self.cfg.user_claim) {
            None | Some(Value::Null) => return Err(OidcError::MissingUser),
            Some(Value::String(s)) => UserId::parse(s).map_err(|_| OidcError::InvalidUser)?,
            Some(_) => return Err(OidcError::InvalidUser),
        };
        let roles = self.roles(claims)?;
        Ok(Principal::authenticated(tenant, user, roles))
    }

    /// `exp` (required), `nbf` and `iat`, each allowed `clock_skew_s`.
    fn check_times(&self, claims: &Map<String, Value>, now_s: i64) -> Result<(), OidcError> {
        let skew = self.cfg.clock_skew_s as f64;
        let now = now_s as f64;
        let exp = time_claim(claims, "exp")?.ok_or(OidcError::MissingExpiry)?;
        if now >= exp + skew {
            return Err(OidcError::Expired);
        }
        for name in ["nbf", "iat"] {
            if let Some(t) = time_claim(claims, name)? {
                if t - skew > now {
                    return Err(OidcError::NotYetValid);
                }
            }
        }
        Ok(())
    }

    /// Issuer, audience, client and scopes.
    fn check_parties(&self, claims: &Map<String, Value>) -> Result<(), OidcError> {
        if claims.get("iss").and_then(Value::as_str) != Some(self.cfg.issuer.as_str()) {
            return Err(OidcError::WrongIssuer);
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => self.cfg.audiences.contains(a),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .any(|a| self.cfg.audiences.iter().any(|c| c == a)),
            _ => false,
        };
        if !aud_ok {
            return Err(OidcError::WrongAudience);
        }
        if !self.cfg.allowed_clients.is_empty() {
            let client = claims
                .get("azp")
                .or_else(|| claims.get("client_id"))
                .and_then(Value::as_str);
            if !client.is_some_and(|c| self.cfg.allowed_clients.iter().any(|a| a == c)) {
                return Err(OidcError::ClientNotAllowed);
            }
        }
        if !self.cfg.required_scopes.is_empty() {
            let granted = scopes(claims);
            if !self
                .cfg
                .required_scopes
                .iter()
                .all(|r| granted.contains(&r.as_str()))
            {
                return Err(OidcError::MissingScope);
            }
        }
        Ok(())
    }

    fn roles(&self, claims: &Map<String, Value>) -> Result<Vec<Role>, OidcError> {
        let values = match claims.get(&self.cfg.roles_claim) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(v)) => v,
            Some(_) => return Err(OidcError::InvalidRoles),
        };
        let mut roles = Vec::new();
        for v in values {
            let v = v.as_str().ok_or(OidcError::InvalidRoles)?;
            if v == self.cfg.admin_role && !roles.contains(&Role::Admin) {
                roles.push(Role::Admin);
            }
        }
        Ok(roles)
    }

    /// The key set to look `kid` up in: the cached one when it is fresh and
    /// holds `kid`, else whatever a (rate-limited) refresh leaves.
    async fn keys_for(&self, kid: &str) -> Result<Arc<KeySet>, OidcError> {
        if let Some(set) = self.cached() {
            let fresh = set.fetched_at.elapsed() < Duration::from_secs(self.cfg.jwks_refresh_s);
            if fresh && set.keys.contains_key(kid) {
                return Ok(set);
            }
        }
        self.refresh().await;
        self.cached().ok_or(OidcError::KeysUnavailable)
    }

    fn cached(&self) -> Option<Arc<KeySet>> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc,
        // which cannot leave the Option half-written; keep using it.
        match self.keys.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Fetches the key set again unless a fetch was tried within
    /// `jwks_min_refetch_s`. On failure the last good set stays.
    async fn refresh(&self) {
        let mut last = self.refresh.lock().await;
        let min = Duration::from_secs(self.cfg.jwks_min_refetch_s);
        if last.is_some_and(|t| t.elapsed() < min) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch_keys().await {
            Ok(set) => {
                let set = Some(Arc::new(set));
                match self.keys.write() {
                    Ok(mut g) => *g = set,
                    Err(p) => *p.into_inner() = set,
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                discovery = %self.discovery_url,
                "could not refresh the OIDC issuer's keys; keeping the last good set"
            ),
        }
    }

    async fn fetch_keys(&self) -> Result<KeySet, FetchError> {
        let discovery: Discovery = self.get_json(&self.discovery_url).await?;
        if discovery.issuer != self.cfg.issuer {
            return Err(FetchError::IssuerMismatch(discovery.issuer));
        }
        let jwks: RawJwks = self.get_json(&discovery.jwks_uri).await?;
        let keys = parse_jwks(jwks.keys, self.cfg.max_keys);
        if keys.is_empty() {
            return Err(FetchError::NoUsableKeys);
        }
        Ok(KeySet {
            keys,
            fetched_at: Instant::now(),
        })
    }

    /// GETs a JSON document, reading at most `max_document_bytes`.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, FetchError> {
        let max = self.cfg.max_document_bytes;
        let mut resp = self.http.get(url).send().await?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(FetchError::TooLarge(max));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > max {
                return Err(FetchError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

/// The header's alg (one of the three allowed) and kid.
fn parse_header(token: &str) -> Result<(Algorithm, String), OidcError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OidcError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| OidcError::Malformed)?;
    let header: RawHeader = serde_json::from_slice(&bytes).map_err(|_| OidcError::Malformed)?;
    // RFC 7515 4.1.11: a recipient must refuse critical extensions it does
    // not implement, and berth implements none.
    if header.crit.is_some() {
        return Err(OidcError::CriticalHeader);
    }
    let alg = match header.alg.as_str() {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        "EdDSA" => Algorithm::EdDSA,
        _ => return Err(OidcError::UnsupportedAlg),
    };
    let kid = header.kid.ok_or(OidcError::MissingKid)?;
    Ok((alg, kid))
}

/// Verifies the signature with `key` and returns the payload. Claims are
/// checked by the caller, so the library's own claim checks are off.
fn verify_signature(token: &str, key: &Key) -> Result<Map<String, Value>, OidcError> {
    let mut validation = Validation::new(key.alg);
    validation.algorithms = vec![key.alg];
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => {
            use jsonwebtoken::errors::ErrorKind as K;
            Err(match e.kind() {
                K::InvalidAlgorithm | K::MissingAlgorithm => OidcError::AlgMismatch,
                K::Base64(_) | K::Json(_) | K::Utf8(_) | K::InvalidToken => OidcError::Malformed,
                _ => OidcError::BadSignature,
            })
        }
    }
}

/// A numeric date claim: `None` when absent.
fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, OidcError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite())
            .map(Some)
            .ok_or(OidcError::BadTimeClaim(name)),
    }
}

/// The scopes a token grants: `scope` (space-separated) and `scp` (an array
/// or a space-separated string).
fn scopes(claims: &Map<String, Value>) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    if let Some(s) = claims.get("scope").and_then(Value::as_str) {
        out.extend(s.split_whitespace());
    }
    match claims.get("scp") {
        Some(Value::String(s)) => out.extend(s.split_whitespace()),
        Some(Value::Array(a)) => out.extend(a.iter().filter_map(Value::as_str)),
        _ => {}
    }
    out
}

/// The usable signing keys of a JWKS, by kid. Keys that cannot be used
/// (no kid, encryption keys, other algs or curves, a repeated kid) are
/// skipped rather than failing the whole set, as issuers publish such keys
/// alongside their signing keys.
fn parse_jwks(raw: Vec<Value>, max_keys: usize) -> HashMap<String, Key> {
    let mut keys = HashMap::new();
    let mut repeated = Vec::new();
    for v in raw.into_iter().take(max_keys) {
        let Ok(jwk) = serde_json::from_value::<Jwk>(v) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let Some(alg) = key_alg(&jwk) else {
            continue;
        };
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        if keys.insert(kid.clone(), Key { alg, decoding }).is_some() {
            repeated.push(kid);
        }
    }
    // Two keys under one kid: which one a token means is ambiguous, so
    // neither is used.
    for kid in repeated {
        keys.remove(&kid);
    }
    keys
}

/// The one alg a JWK may verify, from its type and curve; the JWK's own
/// `alg`, when it has one, must agree.
fn key_alg(jwk: &Jwk) -> Option<Algorithm> {
    let (alg, key_alg) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            (Algorithm::ES256, KeyAlgorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (Algorithm::EdDSA, KeyAlgorithm::EdDSA)
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(alg),
        Some(a) if a == key_alg => Some(alg),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::rand::SystemRandom;
    use ring::signature::{self, KeyPair};
    use serde_json::json;

    const ISS: &str = "http://127.0.0.1:9/issuer";
    const NOW: i64 = 1_800_000_000;

    struct TestKey {
        kid: &'static str,
        alg: Algorithm,
        enc: EncodingKey,
        jwk: Value,
    }

    fn b64(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    fn ed25519(kid: &'static str) -> TestKey {
        let doc = signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        TestKey {
            kid,
            alg: Algorithm::EdDSA,
            enc: EncodingKey::from_ed_der(doc.as_ref()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig",
                        "x": b64(pair.public_key().as_ref())}),
        }
    }

    fn p256(kid: &'static str) -> TestKey {
        let rng = SystemRandom::new();
        let a = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let doc = signature::EcdsaKeyPair::generate_pkcs8(a, &rng).unwrap();
        let pair = signature::EcdsaKeyPair::from_pkcs8(a, doc.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref();
        TestKey {
            kid,
            alg: Algorithm::ES256,
            enc: EncodingKey::from_ec_der(doc.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                        "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
        }
    }

    fn cfg() -> OidcConfig {
        toml::from_str(&format!(
            "issuer = \"{ISS}\"\naudiences = [\"berth\", \"other\"]\n\
             allowed_clients = [\"web\"]\nrequired_scopes = [\"agents:invoke\"]\n"
        ))
        .unwrap()
    }

    /// A verifier holding `keys`, as if it had just fetched them; the
    /// discovery URL is unreachable, so it never learns anything else.
    fn verifier(cfg: OidcConfig, keys: &[&TestKey]) -> OidcVerifier {
        let v = OidcVerifier::new(cfg).unwrap();
        let raw = keys.iter().map(|k| k.jwk.clone()).collect();
        let set = KeySet {
            keys: parse_jwks(raw, 32),
            fetched_at: Instant::now(),
        };
        *v.keys.write().unwrap() = Some(Arc::new(set));
        *v.refresh.try_lock().unwrap() = Some(Instant::now());
        v
    }

    fn claims() -> Value {
        json!({
            "iss": ISS, "aud": "berth", "azp": "web", "scope": "openid agents:invoke",
            "sub": "alice", "tenant": "acme", "roles": ["admin", "viewer"],
            "exp": NOW + 600, "nbf": NOW - 10, "iat": NOW - 10,
        })
    }

    fn sign(key: &TestKey, claims: &Value) -> String {
        let mut h = Header::new(key.alg);
        h.kid = Some(key.kid.into());
        jsonwebtoken::encode(&h, claims, &key.enc).unwrap()
    }

    /// `claims()` with `edit` applied, signed by `key`.
    fn token_with(key: &TestKey, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut c = claims();
        edit(c.as_object_mut().unwrap());
        sign(key, &c)
    }

    type Edit = dyn FnOnce(&mut Map<String, Value>);

    fn reason(r: Result<Principal, OidcError>) -> &'static str {
        r.expect_err("token must be refused").reason()
    }

    #[tokio::test]
    async fn valid_tokens_map_claims_to_a_principal() {
        let (ed, ec) = (ed25519("ed1"), p256("ec1"));
        let v = verifier(cfg(), &[&ed, &ec]);
        for key in [&ed, &ec] {
            let p = v.verify_at(&sign(key, &claims()), NOW).await.unwrap();
            assert_eq!(p.tenant().as_str(), "acme");
            assert_eq!(p.user().as_str(), "alice");
            assert_eq!(p.roles(), &[Role::Admin]);
        }
        // No roles claim: no roles; aud as an array that intersects; the
        // client in client_id; scopes in scp.
        let t = token_with(&ed, |c| {
            c.remove("roles");
            c.remove("azp");
            c.remove("scope");
            c.insert("aud".into(), json!(["x", "other"]));
            c.insert("client_id".into(), json!("web"));
            c.insert("scp".into(), json!(["agents:invoke"]));
        });
        let p = v.verify_at(&t, NOW).await.unwrap();
        assert!(p.roles().is_empty());
    }

    #[tokio::test]
    async fn claim_names_and_admin_role_are_configurable() {
        let ed = ed25519("ed1");
        let mut c = cfg();
        c.tenant_claim = "org".into();
        c.user_claim = "email".into();
        c.roles_claim = "groups".into();
        c.admin_role = "berth-admins".into();
        let v = verifier(c, &[&ed]);
        let t = token_with(&ed, |c| {
            c.insert("org".into(), json!("globex"));
            c.insert("email".into(), json!("bob@globex.example"));
            c.insert("groups".into(), json!(["berth-admins"]));
        });
        let p = v.verify_at(&t, NOW).await.unwrap();
        assert_eq!(p.tenant().as_str(), "globex");
        assert_eq!(p.user().as_str(), "bob@globex.example");
        assert!(p.is_admin());
        // "admin" is no longer the admin role.
        let t = token_with(&ed, |c| {
            c.insert("org".into(), json!("globex"));
            c.insert("email".into(), json!("bob@globex.example"));
            c.insert("groups".into(), json!(["admin"]));
        });
        assert!(!v.verify_at(&t, NOW).await.unwrap().is_admin());
    }

    #[tokio::test]
    async fn times_are_checked_with_the_skew() {
        let ed = ed25519("ed1");
        let v = verifier(cfg(), &[&ed]);
        let set = |name: &'static str, t: i64| {
            token_with(&ed, move |c| _ = c.insert(name.into(), json!(t)))
        };
        assert_eq!(
            reason(v.verify_at(&set("exp", NOW - 61), NOW).await),
            "expired token"
        );
        assert_eq!(
            reason(v.verify_at(&set("exp", NOW - 60), NOW).await),
            "expired token"
        );
        v.verify_at(&set("exp", NOW - 59), NOW).await.unwrap();
        assert_eq!(
            reason(v.verify_at(&set("nbf", NOW + 61), NOW).await),
            "token not yet valid"
        );
        v.verify_at(&set("nbf", NOW + 60), NOW).await.unwrap();
        assert_eq!(
            reason(v.verify_at(&set("iat", NOW + 61), NOW).await),
            "token not yet valid"
        );
        let no_exp = token_with(&ed, |c| _ = c.remove("exp"));
        assert_eq!(reason(v.verify_at(&no_exp, NOW).await), "missing exp");
        let text_exp = token_with(&ed, |c| _ = c.insert("exp".into(), json!("soon")));
        assert_eq!(
            reason(v.verify_at(&text_exp, NOW).await),
            "malformed time claim"
        );
    }

    #[tokio::test]
    async fn each_claim_check_refuses_with_its_reason() {
        let ed = ed25519("ed1");
        let v = verifier(cfg(), &[&ed]);
        let cases: Vec<(&str, Box<Edit>)> = vec![
            (
                "wrong issuer",
                Box::new(|c| _ = c.insert("iss".into(), json!("http://evil"))),
            ),
            (
                "wrong issuer",
                Box::new(|c| _ = c.insert("iss".into(), json!([ISS]))),
            ),
            ("wrong issuer", Box::new(|c| _ = c.remove("iss"))),
            (
                "wrong audience",
                Box::new(|c| _ = c.insert("aud".into(), json!("else"))),
            ),
            (
                "wrong audience",
                Box::new(|c| _ = c.insert("aud".into(), json!(["a", "b"]))),
            ),
            ("wrong audience", Box::new(|c| _ = c.remove("aud"))),
            (
                "client not allowed",
                Box::new(|c| _ = c.insert("azp".into(), json!("cli"))),
            ),
            ("client not allowed", Box::new(|c| _ = c.remove("azp"))),
            (
                "missing scope",
                Box::new(|c| _ = c.insert("scope".into(), json!("openid"))),
            ),
            ("missing scope", Box::new(|c| _ = c.remove("scope"))),
            ("missing tenant claim", Box::new(|c| _ = c.remove("tenant"))),
            (
                "invalid tenant claim",
                Box::new(|c| _ = c.insert("tenant".into(), json!("a/b"))),
            ),
            (
                "invalid tenant claim",
                Box::new(|c| _ = c.insert("tenant".into(), json!(7))),
            ),
            ("missing user claim", Box::new(|c| _ = c.remove("sub"))),
            (
                "invalid user claim",
                Box::new(|c| _ = c.insert("sub".into(), json!(""))),
            ),
            (
                "invalid roles claim",
                Box::new(|c| _ = c.insert("roles".into(), json!("admin"))),
            ),
            (
                "invalid roles claim",
                Box::new(|c| _ = c.insert("roles".into(), json!([1]))),
            ),
        ];
        for (want, edit) in cases {
            let t = token_with(&ed, edit);
            assert_eq!(reason(v.verify_at(&t, NOW).await), want);
        }
    }

    /// A token whose header is `header` and whose payload is `claims()`,
    /// with `sig` as its signature.
    fn forged(header: Value, sig: &[u8]) -> String {
        let h = b64(header.to_string().as_bytes());
        let p = b64(claims().to_string().as_bytes());
        format!("{h}.{p}.{}", b64(sig))
    }

    #[tokio::test]
    async fn forged_and_malformed_tokens_are_refused() {
        let (ed, ec) = (ed25519("ed1"), p256("ec1"));
        let v = verifier(cfg(), &[&ed, &ec]);
        let none = forged(json!({"alg": "none", "kid": "ed1"}), b"");
        assert_eq!(reason(v.verify_at(&none, NOW).await), "unsupported alg");
        // HS256 keyed with the public key bytes: the classic alg confusion.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("ed1".into());
        let public = URL_SAFE_NO_PAD
            .decode(ed.jwk["x"].as_str().unwrap())
            .unwrap();
        let hs = jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(&public)).unwrap();
        assert_eq!(reason(v.verify_at(&hs, NOW).await), "unsupported alg");
        // ES256 in the header, but the kid is an Ed25519 key.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("ed1".into());
        let mixed = jsonwebtoken::encode(&h, &claims(), &ec.enc).unwrap();
        assert_eq!(
            reason(v.verify_at(&mixed, NOW).await),
            "alg does not match key"
        );
        // Re-signed by a key of the attacker's, claiming the issuer's kid.
        let mallory = ed25519("ed1");
        assert_eq!(
            reason(v.verify_at(&sign(&mallory, &claims()), NOW).await),
            "bad signature"
        );
        // A payload changed after signing.
        let good = sign(&ed, &claims());
        let parts: Vec<&str> = good.split('.').collect();
        let mut c = claims();
        c["tenant"] = json!("globex");
        let altered = format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(reason(v.verify_at(&altered, NOW).await), "bad signature");
        let unknown = sign(&ed25519("ed9"), &claims());
        assert_eq!(reason(v.verify_at(&unknown, NOW).await), "unknown key");
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = None;
        let no_kid = jsonwebtoken::encode(&h, &claims(), &ed.enc).unwrap();
        assert_eq!(reason(v.verify_at(&no_kid, NOW).await), "missing kid");
        let crit = forged(json!({"alg": "EdDSA", "kid": "ed1", "crit": ["exp"]}), b"x");
        assert_eq!(
            reason(v.verify_at(&crit, NOW).await),
            "unsupported critical header"
        );
        for bad in ["", "a.b", "a.b.c.d", "!!.b.c", &format!("{}.x", good)] {
            assert_eq!(
                reason(v.verify_at(bad, NOW).await),
                "malformed token",
                "{bad}"
            );
        }
        let big = "a".repeat(8193);
        assert_eq!(reason(v.verify_at(&big, NOW).await), "token too large");
    }

    #[tokio::test]
    async fn no_key_set_means_refusal() {
        let ed = ed25519("ed1");
        let v = OidcVerifier::new(cfg()).unwrap();
        let t = sign(&ed, &claims());
        // The discovery URL refuses connections: the fetch fails.
        assert_eq!(
            reason(v.verify_at(&t, NOW).await),
            "issuer keys unavailable"
        );
    }

    #[test]
    fn jwks_parsing_keeps_only_usable_signing_keys() {
        let (ed, ec) = (ed25519("ed1"), p256("ec1"));
        let mut enc = ed.jwk.clone();
        enc["kid"] = json!("enc");
        enc["use"] = json!("enc");
        let mut wrong_alg = ec.jwk.clone();
        wrong_alg["kid"] = json!("wrong");
        wrong_alg["alg"] = json!("ES384");
        let mut dup = p256("ec1").jwk;
        dup["kid"] = json!("dup");
        let keys = vec![
            ed.jwk.clone(),
            ec.jwk.clone(),
            enc,
            wrong_alg,
            dup.clone(),
            dup,
            json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}),
            json!({"kty": "weird", "kid": "w"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}),
        ];
        let set = parse_jwks(keys, 32);
        let mut kids: Vec<_> = set.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["ec1", "ed1"]);
        assert_eq!(set["ed1"].alg, Algorithm::EdDSA);
        assert_eq!(set["ec1"].alg, Algorithm::ES256);
        assert_eq!(parse_jwks(vec![ed.jwk.clone(), ec.jwk.clone()], 1).len(), 1);
    }

    #[test]
    fn config_defaults_and_limits() {
        let c: OidcConfig =
            toml::from_str("issuer = \"http://i\"\naudiences = [\"berth\"]\n").unwrap();
        assert_eq!(c.tenant_claim, "tenant");
        assert_eq!(c.user_claim, "sub");
        assert_eq!(c.roles_claim, "roles");
        assert_eq!(c.admin_role, "admin");
        assert_eq!(
            (c.clock_skew_s, c.jwks_refresh_s, c.max_token_bytes),
            (60, 300, 8192)
        );
        let v = OidcVerifier::new(c.clone()).unwrap();
        assert_eq!(v.discovery_url, "http://i/.well-known/openid-configuration");
        let mut big = c.clone();
        big.clock_skew_s = 301;
        assert!(matches!(
            OidcVerifier::new(big),
            Err(OidcError::SkewTooLarge(301))
        ));
        let mut none = c.clone();
        none.audiences.clear();
        assert!(matches!(
            OidcVerifier::new(none),
            Err(OidcError::NoAudience)
        ));
        let mut zero = c;
        zero.jwks_min_refetch_s = 0;
        assert!(matches!(
            OidcVerifier::new(zero),
            Err(OidcError::ZeroLimit(_))
        ));
        assert!(
            toml::from_str::<OidcConfig>("issuer = \"i\"\naudiences = [\"a\"]\nx = 1\n").is_err()
        );
        assert!(toml::from_str::<OidcConfig>("issuer = \"i\"\n").is_err());
    }
}
