//! The conformance suite on the gVisor substrate (real runsc).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::path::PathBuf;

use berth_sandbox::Driver;
use common::*;

struct Gvisor(GvisorEnv);

impl conformance::Harness for Gvisor {
    fn driver(&self) -> &dyn Driver {
        &self.0.driver
    }

    fn traces(&self, id: &str) -> Vec<PathBuf> {
        conformance::cgroup_traces(&self.0.cfg.cgroup_name, id, self.0.cfg.state_dir.join(id))
    }

    fn t8_starts(&self) -> usize {
        25
    }
}

conformance_suite!(Gvisor(gvisor_env()));
