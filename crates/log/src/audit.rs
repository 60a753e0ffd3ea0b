//! The audit log: authentication failures, denied accesses and admin
//! actions, each with the principal, the target and the reason.
//!
//! Failed authentications are triggered by anyone who can reach the port, so
//! nothing a client sends is stored as given: every string is cut to
//! [`MAX_AUDIT_FIELD_BYTES`] and stripped of control characters (which could
//! forge lines in a terminal or a log viewer), and the table keeps only the
//! newest `SqliteConfig::max_audit_rows` events.

use berth_core::{TenantId, UserId};
use serde::{Deserialize, Serialize};

/// The most bytes of any one string (action, target, reason, source) kept in
/// an audit event; longer ones are cut at a character boundary.
pub const MAX_AUDIT_FIELD_BYTES: usize = 256;

/// Whether the audited request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    Allowed,
    Denied,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Allowed => "allowed",
            AuditOutcome::Denied => "denied",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allowed" => Some(AuditOutcome::Allowed),
            "denied" => Some(AuditOutcome::Denied),
            _ => None,
        }
    }
}

/// An audit event before the log gives it an id and a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditDraft {
    /// Unknown when authentication failed.
    pub tenant: Option<TenantId>,
    pub user: Option<UserId>,
    /// What was attempted, dotted: `auth.refused`, `access.denied`,
    /// `agent.deploy`, `agent.delete`, `agent.version.delete`, `session.stop`.
    pub action: String,
    /// What it was attempted on: an agent, a session id, a path.
    pub target: Option<String>,
    pub outcome: AuditOutcome,
    pub reason: Option<String>,
    /// The remote address, when the server knows it.
    pub source: Option<String>,
}

impl AuditDraft {
    /// The draft with every string cut and cleaned; see the module docs.
    pub fn bounded(self) -> AuditDraft {
        AuditDraft {
            action: bound(&self.action),
            target: self.target.as_deref().map(bound),
            reason: self.reason.as_deref().map(bound),
            source: self.source.as_deref().map(bound),
            ..self
        }
    }
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Ascending in the order the events were stored; never reused.
    pub id: u64,
    pub at_ms: i64,
    pub tenant: Option<TenantId>,
    pub user: Option<UserId>,
    pub action: String,
    pub target: Option<String>,
    pub outcome: AuditOutcome,
    pub reason: Option<String>,
    pub source: Option<String>,
}

/// Which audit events `SqliteLog::list_audit` returns, oldest first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this tenant's events. `None` matches every event, including
    /// those of failed authentications, which have no tenant.
    pub tenant: Option<TenantId>,
    pub action: Option<String>,
    /// Only events with an id greater than this (a cursor).
    pub after: u64,
    /// At most this many (0 means [`crate::DEFAULT_LIST_LIMIT`]; capped at
    /// [`crate::MAX_LIST_LIMIT`]).
    pub limit: usize,
}

/// `s` without control characters and cut to [`MAX_AUDIT_FIELD_BYTES`].
pub fn bound(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_AUDIT_FIELD_BYTES));
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_AUDIT_FIELD_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_strips_control_characters() {
        assert_eq!(bound("a\nb\r\x1b[31mc\u{7f}d\u{85}"), "ab[31mcd");
    }

    #[test]
    fn bound_cuts_at_a_character_boundary() {
        let long = "é".repeat(MAX_AUDIT_FIELD_BYTES);
        let cut = bound(&long);
        assert!(cut.len() <= MAX_AUDIT_FIELD_BYTES);
        assert_eq!(cut.len(), MAX_AUDIT_FIELD_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
        let odd = format!("a{long}");
        assert_eq!(bound(&odd).len(), MAX_AUDIT_FIELD_BYTES - 1);
    }

    #[test]
    fn drafts_are_bounded_in_every_string() {
        let big = "x".repeat(10_000);
        let d = AuditDraft {
            tenant: None,
            user: None,
            action: big.clone(),
            target: Some(big.clone()),
            outcome: AuditOutcome::Denied,
            reason: Some(big.clone()),
            source: Some(big),
        }
        .bounded();
        for s in [
            Some(&d.action),
            d.target.as_ref(),
            d.reason.as_ref(),
            d.source.as_ref(),
        ] {
            assert_eq!(s.unwrap().len(), MAX_AUDIT_FIELD_BYTES);
        }
    }
}
