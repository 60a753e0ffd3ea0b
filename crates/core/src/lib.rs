//! Plain data shared by every berth crate: ids, the principal, session
//! events and statuses, limits. No IO lives here.

pub mod event;
pub mod ids;
pub mod limits;
pub mod manifest;
pub mod principal;
pub mod status;

pub use event::{EventRecord, SessionEvent, TerminationReason, UsageSample};
pub use ids::{AgentName, IdError, RequestId, SessionId, TenantId, UserId};
pub use limits::{Lifecycle, Resources};
pub use principal::{Principal, Role};
pub use status::SessionStatus;

/// Milliseconds since the Unix epoch, as stored in the session log.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
