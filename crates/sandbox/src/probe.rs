//! Host capability report for `berth doctor`.
#![allow(clippy::unwrap_used)]

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {}

pub fn probe() -> HostReport {
    HostReport {}
}
