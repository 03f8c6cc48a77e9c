//! One integration-test binary: linking is the slow part on two cores.

mod azure;
mod backup;
mod caches;
mod common;
mod crash;
mod engine;
mod fence;
mod kafka;
mod kafka_tls;
mod nulls;
mod pg_tls;
mod pgpass;
mod playbook;
mod quartz;
mod reconcile;
mod redis_tls;
mod repo_trust;
mod restore;
mod rows;
mod search;
mod search_tls;
mod services;
mod storage;
mod wal_archive;
