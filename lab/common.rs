//! What the lab's application, its oracle and the demo agree on: where the
//! servers are, the names of the topic, index, group and gates, and how a
//! case looks outside the database.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const TOPIC: &str = "case-events";
pub const INDEX: &str = "cases";
pub const GROUP: &str = "case-search-projector";
pub const GATE_API: &str = "api-writes";
pub const GATE_RELAY: &str = "outbox-relay";
pub const GATE_PROJECTOR: &str = "case-projector";
pub const SHEDLOCK_JOB: &str = "escalate-overdue-cases";
/// The playbook's gates over the ShedLock job and the Quartz group.
pub const GATE_SHEDLOCK: &str = "case-jobs";
pub const GATE_QUARTZ: &str = "quartz-jobs";
pub const QUARTZ_SCHEDULER: &str = "CaseScheduler";
pub const QUARTZ_GROUP: &str = "case-jobs";
pub const QUARTZ_JOB: &str = "remind-owners";
/// Who the bad job writes as (`cases.updated_by`).
pub const BAD_JOB: &str = "close-stale-cases";

/// The JSON of a case row as the application shows it everywhere outside
/// the database: event payloads, cache values, search documents. The
/// version is `updated_at` in microseconds.
pub const CASE_JSON: &str = "json_build_object('id', id, 'title', title, 'status', status, \
     'owner_id', owner_id, 'priority', priority, \
     'version', (extract(epoch FROM updated_at) * 1000000)::int8)::text";

/// The case an event is about: a case event's case, a payment's case, or
/// the case a compensation (from reentry's template) names.
pub fn event_case(payload: &serde_json::Value) -> i64 {
    payload["case"]["id"]
        .as_i64()
        .or_else(|| payload["payment"]["case"].as_i64())
        .or_else(|| payload["case_id"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// An event's id for the inbox: its `event_id` header (the outbox row's
/// id), or, for a compensation reentry sent, `compensates:` and the id of
/// the event it compensates (header `reentry-compensates`).
pub fn event_id<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Option<String> {
    let mut comp = None;
    for (k, v) in headers {
        match k {
            "event_id" => return Some(String::from_utf8_lossy(v).into_owned()),
            "reentry-compensates" => {
                comp = Some(format!("compensates:{}", String::from_utf8_lossy(v)))
            }
            _ => {}
        }
    }
    comp
}

/// The provider's export, as its CSV has it.
pub const PROVIDER_CSV_HEADER: &str = "idempotency_key,case_id,amount,executed_at";

/// The servers, from the environment the demo sets.
#[derive(Clone)]
pub struct Lab {
    /// The application's own files: `db` (the conninfo it connects to,
    /// re-read on every reconnect, as service discovery would be),
    /// `provider.csv`, the run logs, `requests.log`, `stop`.
    pub dir: PathBuf,
    pub kafka: String,
    pub redis: String,
    pub search: String,
}

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set (scripts/demo sets it)"))
}

/// The Quartz lab's compiled classes and its class path, which
/// `scripts/lib.sh` names for every script (setup compiles the classes).
pub fn quartz_lab() -> Result<(String, String), String> {
    let unset = |name: &str| {
        format!(
            "{name} is not set: scripts/lib.sh sets it for scripts/demo and scripts/test \
             (scripts/setup builds the Quartz lab it names)"
        )
    };
    let classes = std::env::var("REENTRY_QUARTZ_LAB").map_err(|_| unset("REENTRY_QUARTZ_LAB"))?;
    let cp = std::env::var("REENTRY_QUARTZ_CP").map_err(|_| unset("REENTRY_QUARTZ_CP"))?;
    Ok((classes, cp))
}

impl Lab {
    pub fn from_env() -> Result<Lab, String> {
        Ok(Lab {
            dir: PathBuf::from(var("LAB_DIR")?),
            kafka: var("LAB_KAFKA")?,
            redis: var("LAB_REDIS")?,
            search: var("LAB_SEARCH")?,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The database the application uses now.
    pub fn conninfo(&self) -> Result<String, String> {
        std::fs::read_to_string(self.path("db"))
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{}: {e}", self.path("db").display()))
    }

    pub fn db(&self) -> Result<postgres::Client, String> {
        connect(&self.conninfo()?)
    }

    pub fn stopping(&self) -> bool {
        self.path("stop").exists()
    }

    /// While `quiet` exists, clients, the reader and the jobs hold still
    /// (the relay and the projector go on), so that the oracle reads a
    /// world at rest.
    pub fn quiet(&self) -> bool {
        self.path("quiet").exists()
    }
}

pub fn connect(conninfo: &str) -> Result<postgres::Client, String> {
    postgres::Client::connect(conninfo, postgres::NoTls).map_err(|e| format!("connect: {e}"))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// Appends one line in one write (`O_APPEND`): lines of concurrent writers
/// never interleave.
pub fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Whether gate `name` is open on `db`. No row is a closed gate: an
/// application that cannot tell must not act.
pub fn gate_open(
    db: &mut impl postgres::GenericClient,
    name: &str,
) -> Result<bool, postgres::Error> {
    let row = db.query_opt(
        "SELECT enabled FROM system_gate WHERE gate_name = $1",
        &[&name],
    )?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}
