//! Application re-entry after a restore: playbooks, and (next) the plan,
//! the journaled apply and the report built on them.

pub mod check;
pub mod playbook;
pub mod schema;
