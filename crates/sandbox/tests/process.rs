//! The conformance suite on the process substrate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::path::{Path, PathBuf};

use berth_sandbox::process::{CGROUP_ROOT, CONTROLLERS};
use berth_sandbox::Driver;
use common::*;

struct Process(Env);

impl conformance::Harness for Process {
    fn driver(&self) -> &dyn Driver {
        &self.0.driver
    }

    fn traces(&self, id: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = CONTROLLERS
            .iter()
            .map(|c| {
                Path::new(CGROUP_ROOT)
                    .join(c)
                    .join(&self.0.cfg.cgroup_name)
                    .join(id)
            })
            .collect();
        v.push(self.0.cfg.state_dir.join(id));
        v
    }

    fn t8_starts(&self) -> usize {
        200
    }
}

conformance_suite!(Process(env()));
