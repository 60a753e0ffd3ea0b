//! Newtype ids. Each one is validated at construction, so a value of these
//! types is always safe to log, to put in a path and to echo in a header.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a string was refused as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must be {min} to {max} characters long, got {len}")]
    Length {
        kind: &'static str,
        min: usize,
        max: usize,
        len: usize,
    },
    #[error("{kind} may contain only {allowed}")]
    Charset {
        kind: &'static str,
        allowed: &'static str,
    },
}

fn check(
    kind: &'static str,
    s: &str,
    min: usize,
    max: usize,
    allowed: &'static str,
    first: fn(u8) -> bool,
    rest: fn(u8) -> bool,
) -> Result<(), IdError> {
    let len = s.len();
    if len < min || len > max {
        return Err(IdError::Length {
            kind,
            min,
            max,
            len,
        });
    }
    let bytes = s.as_bytes();
    if !first(bytes[0]) || !bytes[1..].iter().all(|b| rest(*b)) {
        return Err(IdError::Charset { kind, allowed });
    }
    Ok(())
}

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}
fn alnum_dash_underscore(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}
fn lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}
fn lower_alnum_dash_underscore(b: u8) -> bool {
    lower_alnum(b) || b == b'-' || b == b'_'
}
fn name_rest(b: u8) -> bool {
    alnum_dash_underscore(b) || b == b'.' || b == b'@'
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A session id as AgentCore defines it: 33 to 256 characters,
    /// `[a-zA-Z0-9][a-zA-Z0-9-_]*`.
    SessionId
);
string_id!(
    /// An agent name: 1 to 63 characters, `[a-z0-9][a-z0-9-_]*`.
    AgentName
);
string_id!(
    /// A tenant: 1 to 128 characters, `[a-zA-Z0-9][a-zA-Z0-9-_.@]*`.
    TenantId
);
string_id!(
    /// A user within a tenant: 1 to 128 characters, `[a-zA-Z0-9][a-zA-Z0-9-_.@]*`.
    UserId
);
string_id!(
    /// One request's id, sent to the agent in
    /// `X-Amzn-Bedrock-AgentCore-Runtime-Request-Id`.
    RequestId
);

impl SessionId {
    pub const MIN_LEN: usize = 33;
    pub const MAX_LEN: usize = 256;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "session id",
            s,
            Self::MIN_LEN,
            Self::MAX_LEN,
            "ASCII letters, digits, '-' and '_', starting with a letter or digit",
            alnum,
            alnum_dash_underscore,
        )?;
        Ok(Self(s.to_owned()))
    }

    /// A fresh id of valid length (a UUID plus a prefix: 41 characters).
    pub fn generate() -> Self {
        Self(format!("session-{}", uuid::Uuid::new_v4()))
    }
}

impl AgentName {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "agent name",
            s,
            1,
            63,
            "lowercase ASCII letters, digits, '-' and '_', starting with a letter or digit",
            lower_alnum,
            lower_alnum_dash_underscore,
        )?;
        Ok(Self(s.to_owned()))
    }
}

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "tenant",
            s,
            1,
            128,
            "ASCII letters, digits, '-', '_', '.' and '@'",
            alnum,
            name_rest,
        )?;
        Ok(Self(s.to_owned()))
    }
}

impl UserId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "user",
            s,
            1,
            128,
            "ASCII letters, digits, '-', '_', '.' and '@'",
            alnum,
            name_rest,
        )?;
        Ok(Self(s.to_owned()))
    }
}

impl RequestId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "request id",
            s,
            1,
            128,
            "ASCII letters, digits, '-' and '_'",
            alnum,
            alnum_dash_underscore,
        )?;
        Ok(Self(s.to_owned()))
    }

    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_bounds() {
        assert!(SessionId::parse(&"a".repeat(32)).is_err());
        assert!(SessionId::parse(&"a".repeat(33)).is_ok());
        assert!(SessionId::parse(&"a".repeat(256)).is_ok());
        assert!(SessionId::parse(&"a".repeat(257)).is_err());
        assert!(SessionId::parse(&format!("-{}", "a".repeat(40))).is_err());
        assert!(SessionId::parse(&format!("{}\r\nx", "a".repeat(40))).is_err());
        assert!(SessionId::parse(&format!("{}\0", "a".repeat(40))).is_err());
        let g = SessionId::generate();
        assert!(SessionId::parse(g.as_str()).is_ok());
    }

    #[test]
    fn agent_names() {
        assert!(AgentName::parse("echo").is_ok());
        assert!(AgentName::parse("Echo").is_err());
        assert!(AgentName::parse("").is_err());
        assert!(AgentName::parse("a/b").is_err());
        assert!(AgentName::parse("../x").is_err());
    }

    #[test]
    fn deserialize_validates() {
        let r: Result<TenantId, _> = serde_json::from_str("\"bad name\"");
        assert!(r.is_err());
    }
}
