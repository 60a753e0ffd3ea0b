//! Sessions: one actor per live session, the session manager that routes
//! requests to them, lifecycle and deadlines, ownership checks and metering.
//!
//! This crate knows nothing of HTTP routes: the server hands it a principal,
//! a session id, a resolved agent and a request already shaped for the agent.

mod actor;
mod body;
mod config;
mod error;
mod expiry;
mod manager;
mod quota;

pub use body::{TurnBody, TurnStats};
pub use config::{SessionConfig, WorkloadTokens};
pub use error::SessionError;
pub use manager::{AgentSpec, Invocation, RecoveryReport, SessionManager};
pub use quota::{QuotaConfig, QuotaError};
