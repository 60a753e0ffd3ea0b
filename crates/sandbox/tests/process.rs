//! The conformance suite on the process substrate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::path::PathBuf;

use berth_sandbox::Driver;
use common::*;

struct Process(Env);

impl conformance::Harness for Process {
    fn driver(&self) -> &dyn Driver {
        &self.0.driver
    }

    fn traces(&self, id: &str) -> Vec<PathBuf> {
        conformance::cgroup_traces(&self.0.cfg.cgroup_name, id, self.0.cfg.state_dir.join(id))
    }

    fn t8_starts(&self) -> usize {
        200
    }
}

conformance_suite!(Process(env()));
