//! berth server: HTTP API, auth, config.

pub mod deploy;
