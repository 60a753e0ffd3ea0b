//! The lifecycle of a session's current activation.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Provisioning -> Active <-> Idle -> Terminated; any state may go to
/// Terminated. A terminated session id that is used again starts a new
/// activation in Provisioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Provisioning,
    Active,
    Idle,
    Terminated,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Active => "active",
            Self::Idle => "idle",
            Self::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "provisioning" => Self::Provisioning,
            "active" => Self::Active,
            "idle" => Self::Idle,
            "terminated" => Self::Terminated,
            _ => return None,
        })
    }

    /// Whether a transition from `self` to `to` is legal.
    pub fn can_transition(self, to: Self) -> bool {
        use SessionStatus::*;
        matches!(
            (self, to),
            (Provisioning, Active)
                | (Provisioning, Idle)
                | (Active, Idle)
                | (Idle, Active)
                | (Provisioning | Active | Idle, Terminated)
                | (Terminated, Provisioning)
        )
    }

    /// Whether the session can take an invocation now.
    pub fn can_invoke(self) -> bool {
        matches!(self, Self::Active | Self::Idle)
    }

    pub fn is_live(self) -> bool {
        !matches!(self, Self::Terminated)
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::SessionStatus::*;

    #[test]
    fn transitions() {
        assert!(Provisioning.can_transition(Active));
        assert!(Active.can_transition(Idle));
        assert!(Idle.can_transition(Active));
        assert!(Idle.can_transition(Terminated));
        assert!(!Terminated.can_transition(Active));
        assert!(Terminated.can_transition(Provisioning));
        assert!(!Active.can_transition(Provisioning));
    }
}
