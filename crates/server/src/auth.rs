//! Authentication: turns a request's credential into a `Principal`.
//! API keys are `berth_<id>_<secret>`; only their SHA-256 is stored.

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

/// The authenticated caller of a request.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(ApiError::unauthorized)?;
        let key = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|k| k.starts_with("berth_") && k.len() < 200)
            .ok_or_else(ApiError::unauthorized)?;
        let rec = state
            .store
            .api_key_by_hash(&hash_key(key))
            .await
            .map_err(ApiError::internal)?
            .filter(|r| !r.revoked)
            .ok_or_else(ApiError::unauthorized)?;
        Ok(Auth(Principal::authenticated(
            rec.tenant, rec.user, rec.roles,
        )))
    }
}

impl Auth {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.0.is_admin() {
            Ok(())
        } else {
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
