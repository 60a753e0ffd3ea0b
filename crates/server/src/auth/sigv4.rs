//! AWS SigV4 signatures made with access key pairs berth issued.

use berth_core::Principal;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SigV4Error {
    #[error("signature refused")]
    Refused,
}

impl SigV4Error {
    /// A short, stable reason for the audit log.
    pub fn reason(&self) -> &'static str {
        "invalid signature"
    }
}

/// Verifies SigV4-signed requests.
pub struct SigV4Verifier {
    _store: Arc<berth_log::SqliteLog>,
}

impl SigV4Verifier {
    pub fn new(store: Arc<berth_log::SqliteLog>) -> Self {
        Self { _store: store }
    }

    pub async fn verify(
        &self,
        _parts: &http::request::Parts,
        _body: &[u8],
    ) -> Result<Principal, SigV4Error> {
        Err(SigV4Error::Refused)
    }
}
