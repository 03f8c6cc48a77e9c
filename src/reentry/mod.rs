//! Application re-entry after a restore: playbooks, the plan built from
//! them, the journaled apply that walks it, and the evidence report.

pub mod check;
pub mod journal;
pub mod owned;
pub mod plan;
pub mod playbook;
pub mod report;
pub mod run;
pub mod schema;
pub mod steps;
