//! The lab: a sample case-management application, its incident, and the
//! oracle that says whether its world agrees again (scripts/demo).
//!
//!   lab init                      schema, gates, ShedLock row, Quartz tables, search index
//!   lab load N                    N cases and N/4 payments through the API
//!   lab run [CLIENTS]             the application, until $LAB_DIR/stop exists
//!   lab bad-job                   closes every open case (a wrong predicate)
//!   lab oracle LABEL SURVIVOR RETIRED [RUN_DIR]
//!                                 each property, one line; JSON in $LAB_DIR/oracle-LABEL.json
//!   lab oracle-table BEFORE AFTER OUT
//!                                 the before/after table, for people and for `reentry report`
//!
//! The servers come from LAB_DIR, LAB_KAFKA, LAB_REDIS and LAB_SEARCH.

mod app;
mod common;
mod oracle;

use common::*;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["oracle-table", before, after, out] => oracle::table(before, after, out),
        rest => Lab::from_env().and_then(|lab| match rest {
            ["init"] => init(&lab),
            ["load", n] => load(&lab, n.parse().map_err(|_| format!("not a number: {n}"))?),
            ["run"] => app::run(&lab, 2).map(|()| true),
            ["run", n] => {
                app::run(&lab, n.parse().map_err(|_| format!("not a number: {n}"))?).map(|()| true)
            }
            ["bad-job"] => bad_job(&lab),
            ["oracle", label, survivor, retired] => {
                oracle::run(&lab, label, survivor, retired, None)
            }
            ["oracle", label, survivor, retired, run_dir] => {
                oracle::run(&lab, label, survivor, retired, Some(run_dir))
            }
            _ => Err("usage: see lab/main.rs".into()),
        }),
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("lab: {e}");
            std::process::exit(2);
        }
    }
}

/// The schema, the gates (open), the ShedLock row, Quartz's own tables and
/// the search index.
fn init(lab: &Lab) -> Result<bool, String> {
    let mut db = lab.db()?;
    let quartz = quartz_schema()?;
    let e = |e: postgres::Error| reentry::pg::conn::describe(&e);
    db.batch_execute(include_str!("../sql/system_gate.sql"))
        .map_err(e)?;
    db.batch_execute(include_str!("../sql/case-management.sql"))
        .map_err(e)?;
    db.batch_execute(&quartz).map_err(e)?;
    for g in [GATE_API, GATE_RELAY, GATE_PROJECTOR] {
        db.execute(
            "INSERT INTO system_gate (gate_name, enabled) VALUES ($1, true) ON CONFLICT DO NOTHING",
            &[&g],
        )
        .map_err(e)?;
    }
    db.execute(
        "INSERT INTO shedlock VALUES ($1, now() - interval '1 hour', now() - interval '1 hour', 'nobody') \
         ON CONFLICT DO NOTHING",
        &[&SHEDLOCK_JOB],
    )
    .map_err(e)?;
    // The provider's export starts with its header.
    let csv = lab.path("provider.csv");
    if !csv.exists() {
        std::fs::write(&csv, format!("{PROVIDER_CSV_HEADER}\n")).map_err(|e| e.to_string())?;
    }
    // No replica: the demo's node is a cluster of one, where a replica is
    // never assigned and the index would stay yellow.
    let r = reqwest::blocking::Client::new()
        .put(format!("{}/{INDEX}", lab.search))
        .json(&serde_json::json!({
            "settings": { "number_of_shards": 1, "number_of_replicas": 0 },
            "mappings": { "properties": {
                "title": { "type": "text" }, "status": { "type": "keyword" },
                "owner_id": { "type": "long" }, "priority": { "type": "integer" },
                "version": { "type": "long" } } } }))
        .send()
        .map_err(|e| format!("search: {e}"))?;
    let status = r.status();
    if !status.is_success() {
        let v: serde_json::Value = r.json().unwrap_or_default();
        // init runs again on the same servers: an index it made is fine.
        if v["error"]["type"] != "resource_already_exists_exception" {
            return Err(format!("search: create index {INDEX}: HTTP {status}: {v}"));
        }
    }
    Ok(true)
}

/// Quartz's `tables_postgres.sql`, as setup takes it from the jar into the
/// compiled lab (`$REENTRY_QUARTZ_LAB`), made safe to run again: its own
/// drops and commit left out, its tables and indexes created if missing.
fn quartz_schema() -> Result<String, String> {
    let (dir, _) = common::quartz_lab()?;
    let path = std::path::Path::new(&dir).join("tables_postgres.sql");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let sql = text
        .lines()
        .filter(|l| {
            let t = l.trim_start().to_ascii_lowercase();
            !t.starts_with("drop table") && !t.starts_with("commit")
        })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(sql
        .replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ")
        .replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS "))
}

/// `n` cases and `n / 4` payments, through the API.
fn load(lab: &Lab, n: i64) -> Result<bool, String> {
    let mut db = lab.db()?;
    let mut cache = app::Cache::connect(&lab.redis)?;
    for i in 0..n {
        match app::api(
            lab,
            &mut db,
            &app::Req::Create(format!("case {i} of the load")),
        ) {
            Ok(app::Outcome::Done(json)) => cache.put(&json).map_err(|e| e.to_string())?,
            other => return Err(format!("load: {other:?}")),
        }
    }
    for i in 0..n / 4 {
        let req = app::Req::Pay(1 + i * 4 % n.max(1), format!("load-pay-{i}"), 100 + i);
        match app::api(lab, &mut db, &req) {
            Ok(app::Outcome::Done(_)) => {}
            other => return Err(format!("load: {other:?}")),
        }
    }
    Ok(true)
}

/// A bad job: meant to close open cases untouched for 30 days, its
/// predicate closes every open case. It locks the table as its author
/// thought wise, writes an event per case through the outbox, and keeps
/// its own list of what it closed in `bad-job.ids`. Prints the time of its
/// first write.
///
/// The lock is EXCLUSIVE, which waits out the escalation job's
/// `FOR UPDATE SKIP LOCKED` (ROW SHARE). SHARE ROW EXCLUSIVE did not: it was
/// granted beside that job's row locks, the job's UPDATE then queued behind
/// it, and PostgreSQL broke the deadlock by killing the bad job.
fn bad_job(lab: &Lab) -> Result<bool, String> {
    let mut db = lab.db()?;
    let e = |e: postgres::Error| reentry::pg::conn::describe(&e);
    let mut tx = db.transaction().map_err(e)?;
    tx.batch_execute("LOCK TABLE cases IN EXCLUSIVE MODE; SELECT pg_sleep(0.05)")
        .map_err(e)?;
    let rows = tx
        .query(
            &format!(
                "UPDATE cases SET status = 'closed', updated_by = $1, updated_at = clock_timestamp() \
                 WHERE status = 'open' AND (updated_at < now() - interval '30 days' OR priority >= 0) \
                 RETURNING id, {CASE_JSON}"
            ),
            &[&BAD_JOB],
        )
        .map_err(e)?;
    let mut ids = Vec::new();
    for r in &rows {
        let (id, json): (i64, String) = (r.get(0), r.get(1));
        app::outbox(
            &mut tx,
            id,
            &format!(r#"{{"type":"case-closed","by":"{BAD_JOB}","case":{json}}}"#),
        )
        .map_err(e)?;
        ids.push(id.to_string());
    }
    tx.commit().map_err(e)?;
    std::fs::write(lab.path("bad-job.ids"), ids.join("\n") + "\n").map_err(|e| e.to_string())?;
    println!("{}", ids.len());
    Ok(true)
}
