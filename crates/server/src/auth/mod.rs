//! Authentication: turns a request's credential into a `Principal`.
//!
//! Three credentials are accepted, told apart by the `Authorization` header:
//! - `Bearer berth_<id>_<secret>`: an API key issued by berth; only its
//!   SHA-256 is stored.
//! - `Bearer <JWT>`: a token of the configured OIDC issuer (`oidc.rs`).
//! - `AWS4-HMAC-SHA256 ...`: a SigV4 signature made with an access key pair
//!   berth issued (`sigv4.rs`). The signature covers the body, so the
//!   middleware reads the body (within the body limit) before verifying.
//!
//! The middleware (`layer`) runs on every request and leaves its verdict in
//! the request's extensions; the `Auth` extractor turns a refusal into the
//! same 401 for every cause and records the cause in the audit log.

pub mod oidc;
pub mod sigv4;

use crate::error::ApiError;
use crate::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use berth_core::{now_ms, Principal, Role, TenantId, UserId};
use berth_log::ApiKeyRecord;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The SHA-256 of a key, hex: what the store keeps.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Makes a new API key for `tenant`/`user`. The plaintext is returned once
/// and never stored.
pub fn new_api_key(tenant: TenantId, user: UserId, roles: Vec<Role>) -> (String, ApiKeyRecord) {
    let mut id = [0u8; 6];
    let mut secret = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut id);
    rand::thread_rng().fill_bytes(&mut secret);
    let id = hex::encode(id);
    let key = format!("berth_{id}_{}", hex::encode(secret));
    let record = ApiKeyRecord {
        id,
        hash: hash_key(&key),
        tenant,
        user,
        roles,
        created_at_ms: now_ms(),
        revoked: false,
    };
    (key, record)
}

/// Why a request was not authenticated. Callers always get the same 401;
/// the reason is for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub &'static str);

/// The middleware's verdict, kept in the request's extensions.
#[derive(Clone)]
struct Verdict(Result<Principal, Refusal>);

/// Authenticates every request and records the verdict for `Auth`.
pub async fn layer(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (mut req, verdict) = match header {
        None => (req, Err(Refusal("missing credential"))),
        Some(h) if h.starts_with("AWS4-HMAC-SHA256 ") => match sigv4_verdict(&state, req).await {
            Ok(pair) => pair,
            Err(resp) => return resp.into_response(),
        },
        Some(h) => match h.strip_prefix("Bearer ").map(str::trim) {
            Some(token) if token.starts_with("berth_") => {
                let v = api_key(&state, token).await;
                (req, v)
            }
            Some(token) => {
                let v = jwt(&state, token).await;
                (req, v)
            }
            None => (req, Err(Refusal("unsupported authorization scheme"))),
        },
    };
    req.extensions_mut().insert(Verdict(verdict));
    next.run(req).await
}

async fn api_key(state: &AppState, key: &str) -> Result<Principal, Refusal> {
    if key.len() > 200 {
        return Err(Refusal("malformed api key"));
    }
    let rec = state
        .store
        .api_key_by_hash(&hash_key(key))
        .await
        .map_err(|_| Refusal("key store unavailable"))?
        .ok_or(Refusal("unknown api key"))?;
    if rec.revoked {
        return Err(Refusal("revoked api key"));
    }
    Ok(Principal::authenticated(rec.tenant, rec.user, rec.roles))
}

async fn jwt(state: &AppState, token: &str) -> Result<Principal, Refusal> {
    let Some(verifier) = &state.oidc else {
        return Err(Refusal(
            "bearer token is not a berth key and no OIDC issuer is configured",
        ));
    };
    verifier
        .verify(token)
        .await
        .map_err(|e| Refusal(e.reason()))
}

/// Reads the body (SigV4 signs it), verifies, and puts the body back.
async fn sigv4_verdict(
    state: &AppState,
    req: axum::extract::Request,
) -> Result<(axum::extract::Request, Result<Principal, Refusal>), crate::error::ApiError> {
    let (parts, body) = req.into_parts();
    let limit = state.cfg.max_body_bytes as usize;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        crate::error::ApiError::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    })?;
    let verdict = state
        .sigv4
        .verify(&parts, &bytes)
        .await
        .map_err(|e| Refusal(e.reason()));
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    Ok((req, verdict))
}

/// The authenticated caller of a request.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match parts.extensions.get::<Verdict>() {
            Some(Verdict(Ok(p))) => Ok(Auth(p.clone())),
            Some(Verdict(Err(Refusal(reason)))) => {
                tracing::info!(reason, path = %parts.uri.path(), "authentication refused");
                crate::audit::refused(state, parts, reason);
                Err(ApiError::unauthorized())
            }
            None => Err(ApiError::unauthorized()),
        }
    }
}

impl Auth {
    /// Refuses (and audits the refusal) unless the caller is an admin;
    /// `target` names what was attempted, for the audit log.
    pub fn require_admin(&self, state: &AppState, target: &str) -> Result<(), ApiError> {
        if self.0.is_admin() {
            Ok(())
        } else {
            crate::audit::denied(state, &self.0, target, "needs the admin role");
            Err(ApiError::forbidden("this action needs the admin role"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hashed() {
        let t = TenantId::parse("t").unwrap();
        let u = UserId::parse("u").unwrap();
        let (k1, r1) = new_api_key(t.clone(), u.clone(), vec![]);
        let (k2, r2) = new_api_key(t, u, vec![]);
        assert_ne!(k1, k2);
        assert_eq!(r1.hash, hash_key(&k1));
        assert_ne!(r1.hash, r2.hash);
        assert!(!r1.hash.contains(&k1));
    }
}
