//! Gates: the kill switches Java services check. `system_gate` rows,
//! ShedLock rows and Quartz trigger groups are closed on each database
//! before anything else happens, and re-opened at the end to exactly the
//! state the run found, which the close journaled before changing it.
//!
//! Every statement is conditional on the state it changes, so running it
//! again after a crash changes nothing: a row already closed is not touched.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Effect, Env, Nature, OnDatabase, Recorder, Step, StepError};
use crate::pg::conn::{Db, PgError};
use crate::reentry::check::quote_qualified;

/// `lock_until` of a frozen ShedLock row: far enough that no job takes it.
pub const FROZEN_UNTIL: &str = "2999-01-01 00:00:00+00";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Gate {
    SystemGate {
        name: String,
        table: String,
    },
    Shedlock {
        name: String,
        table: String,
        locks: Option<Vec<String>>,
    },
    #[serde(rename_all = "kebab-case")]
    Quartz {
        name: String,
        table_prefix: String,
        scheduler: String,
        groups: Option<Vec<String>>,
    },
}

impl Gate {
    pub fn name(&self) -> &str {
        match self {
            Gate::SystemGate { name, .. }
            | Gate::Shedlock { name, .. }
            | Gate::Quartz { name, .. } => name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Gate::SystemGate { .. } => "system-gate",
            Gate::Shedlock { .. } => "shedlock",
            Gate::Quartz { .. } => "quartz",
        }
    }
}

/// A gate on one database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateAt {
    pub gate: Gate,
    pub database: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Reopen {
    pub gate: Gate,
    pub database: String,
    /// The close step whose journaled prior state this restores.
    pub close_step: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WaitCache {
    pub ttl_seconds: f64,
    /// The close steps the wait counts from.
    pub after: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Closed {
    pub step: String,
    pub at: GateAt,
}

/// Re-asserts every close after the cache TTL: a ShedLock holder that was
/// still running at the close releases its lock when it finishes, and an
/// operator may have flipped a gate by hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verify {
    pub closed: Vec<Closed>,
}

fn parse_json(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn has_column(db: &mut Db, table: &str, column: &str) -> Result<bool, PgError> {
    let row = db.query_one(
        "look up a column",
        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass($1)
                          AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
        &[&quote_qualified(table), &column],
    )?;
    Ok(row.get(0))
}

fn quartz_tables(prefix: &str) -> (String, String) {
    (
        quote_qualified(&format!("{prefix}triggers")),
        quote_qualified(&format!("{prefix}paused_trigger_grps")),
    )
}

/// The state of the rows a gate controls. `lock` takes row locks: the
/// close that follows in the same transaction changes exactly what was read.
pub fn read_state(db: &mut Db, gate: &Gate, lock: bool) -> Result<Value, PgError> {
    let for_update = if lock { " FOR UPDATE" } else { "" };
    match gate {
        Gate::SystemGate { name, table } => {
            let t = quote_qualified(table);
            let rows = db.query(
                "read a system_gate row",
                &format!(
                    "SELECT to_jsonb(g)::text FROM {t} AS g WHERE g.gate_name = $1{for_update}"
                ),
                &[name],
            )?;
            Ok(parse_json(rows.first().map(|r| r.get(0))))
        }
        Gate::Shedlock { table, locks, .. } => {
            let t = quote_qualified(table);
            let rows = match locks {
                Some(names) => db.query(
                    "read ShedLock rows",
                    &format!(
                        "SELECT s.name::text, to_jsonb(s)::text FROM {t} AS s
                          WHERE s.name = ANY($1) ORDER BY 1{for_update}"
                    ),
                    &[names],
                )?,
                None => db.query(
                    "read ShedLock rows",
                    &format!(
                        "SELECT s.name::text, to_jsonb(s)::text FROM {t} AS s ORDER BY 1{for_update}"
                    ),
                    &[],
                )?,
            };
            let mut found: BTreeMap<String, Value> = rows
                .iter()
                .map(|r| (r.get::<_, String>(0), parse_json(Some(r.get(1)))))
                .collect();
            for n in locks.iter().flatten() {
                found.entry(n.clone()).or_insert(Value::Null);
            }
            Ok(json!({ "locks": found }))
        }
        Gate::Quartz {
            table_prefix,
            scheduler,
            groups,
            ..
        } => {
            let (tr, pg) = quartz_tables(table_prefix);
            let groups: Vec<String> = match groups {
                Some(g) => g.clone(),
                None => db
                    .query(
                        "list Quartz trigger groups",
                        &format!(
                            "SELECT DISTINCT trigger_group::text FROM {tr} WHERE sched_name = $1
                             UNION SELECT trigger_group::text FROM {pg} WHERE sched_name = $1 ORDER BY 1"
                        ),
                        &[scheduler],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
            };
            let paused: Vec<String> = db
                .query(
                    "read paused Quartz groups",
                    &format!(
                        "SELECT trigger_group::text FROM {pg}
                          WHERE sched_name = $1 AND trigger_group = ANY($2) ORDER BY 1"
                    ),
                    &[scheduler, &groups],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let triggers: Vec<Value> = db
                .query(
                    "read Quartz triggers",
                    &format!(
                        "SELECT trigger_name::text, trigger_group::text, trigger_state::text FROM {tr}
                          WHERE sched_name = $1 AND trigger_group = ANY($2) ORDER BY 2, 1{for_update}"
                    ),
                    &[scheduler, &groups],
                )?
                .iter()
                .map(|r| {
                    json!({"name": r.get::<_, String>(0), "group": r.get::<_, String>(1), "state": r.get::<_, String>(2)})
                })
                .collect();
            Ok(json!({"groups": groups, "paused-groups": paused, "triggers": triggers}))
        }
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn lock_rows(prior: &Value) -> Map<String, Value> {
    prior
        .get("locks")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// Quartz states a pause moves, and what a resume restores them to
/// (ACQUIRED comes back WAITING, as Quartz's own resume does).
fn resumed_state(prior: &str) -> Option<&'static str> {
    match prior {
        "WAITING" | "ACQUIRED" => Some("WAITING"),
        "BLOCKED" => Some("BLOCKED"),
        _ => None,
    }
}

/// Closes the gate. Conditional on every row's state: the count is what
/// actually changed, zero when it was already closed.
fn close(
    db: &mut Db,
    gate: &Gate,
    prior: &Value,
    marker: &str,
) -> Result<(u64, Vec<String>), PgError> {
    match gate {
        Gate::SystemGate { name, table } => {
            let t = quote_qualified(table);
            let stamp = if has_column(db, table, "updated_at")? {
                ", updated_at = now()"
            } else {
                ""
            };
            let n = db.execute(
                "close a system_gate row",
                &format!("UPDATE {t} SET enabled = false{stamp} WHERE gate_name = $1 AND enabled IS DISTINCT FROM false"),
                &[name],
            )? + db.execute(
                "insert a closed system_gate row",
                &format!("INSERT INTO {t} (gate_name, enabled) SELECT $1::text, false
                           WHERE NOT EXISTS (SELECT FROM {t} WHERE gate_name = $1::text)"),
                &[name],
            )?;
            Ok((n, if n > 0 { vec![name.clone()] } else { vec![] }))
        }
        Gate::Shedlock { table, .. } => {
            let t = quote_qualified(table);
            let (mut n, mut ids) = (0, Vec::new());
            for name in lock_rows(prior).keys() {
                let c = db.execute(
                    "freeze a ShedLock row",
                    &format!(
                        "UPDATE {t} SET lock_until = $2::text::timestamptz, locked_at = now(), locked_by = $3
                          WHERE name = $1 AND NOT (locked_by = $3 AND lock_until = $2::text::timestamptz)"
                    ),
                    &[name, &FROZEN_UNTIL, &marker],
                )? + db.execute(
                    "insert a frozen ShedLock row",
                    &format!(
                        "INSERT INTO {t} (name, lock_until, locked_at, locked_by)
                         SELECT $1::text, $2::text::timestamptz, now(), $3::text
                          WHERE NOT EXISTS (SELECT FROM {t} WHERE name = $1::text)"
                    ),
                    &[name, &FROZEN_UNTIL, &marker],
                )?;
                if c > 0 {
                    ids.push(name.clone());
                }
                n += c;
            }
            Ok((n, ids))
        }
        Gate::Quartz {
            table_prefix,
            scheduler,
            ..
        } => {
            let (tr, pg) = quartz_tables(table_prefix);
            let groups = strings(&prior["groups"]);
            db.execute(
                "pause Quartz groups",
                &format!(
                    "INSERT INTO {pg} (sched_name, trigger_group) SELECT $1::text, g FROM unnest($2::text[]) AS g
                      WHERE NOT EXISTS (SELECT FROM {pg} p WHERE p.sched_name = $1::text AND p.trigger_group = g)"
                ),
                &[scheduler, &groups],
            )?;
            let rows = db.query(
                "pause Quartz triggers",
                &format!(
                    "UPDATE {tr} SET trigger_state = CASE trigger_state WHEN 'BLOCKED' THEN 'PAUSED_BLOCKED' ELSE 'PAUSED' END
                      WHERE sched_name = $1 AND trigger_group = ANY($2) AND trigger_state IN ('WAITING', 'ACQUIRED', 'BLOCKED')
                      RETURNING trigger_group::text || '.' || trigger_name::text"
                ),
                &[scheduler, &groups],
            )?;
            let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            Ok((ids.len() as u64, ids))
        }
    }
}

/// Puts back what the close found, only where the close's state is still
/// there: running it twice restores once.
fn reopen(
    db: &mut Db,
    gate: &Gate,
    prior: &Value,
    marker: &str,
) -> Result<(u64, Vec<String>), PgError> {
    match gate {
        Gate::SystemGate { name, table } => {
            let t = quote_qualified(table);
            let n = if prior.is_null() {
                db.execute(
                    "remove the system_gate row the close inserted",
                    &format!("DELETE FROM {t} WHERE gate_name = $1 AND enabled = false"),
                    &[name],
                )?
            } else {
                let stamp = if has_column(db, table, "updated_at")? {
                    ", updated_at = now()"
                } else {
                    ""
                };
                db.execute(
                    "re-open a system_gate row",
                    &format!(
                        "UPDATE {t} AS g SET enabled = r.enabled{stamp}
                           FROM jsonb_populate_record(NULL::{t}, $2::text::jsonb) AS r
                          WHERE g.gate_name = $1 AND g.enabled = false AND r.enabled IS DISTINCT FROM false"
                    ),
                    &[name, &prior.to_string()],
                )?
            };
            Ok((n, if n > 0 { vec![name.clone()] } else { vec![] }))
        }
        Gate::Shedlock { table, .. } => {
            let t = quote_qualified(table);
            let (mut n, mut ids) = (0, Vec::new());
            for (name, row) in lock_rows(prior) {
                let c = if row.is_null() {
                    db.execute(
                        "remove the ShedLock row the close inserted",
                        &format!("DELETE FROM {t} WHERE name = $1 AND locked_by = $2"),
                        &[&name, &marker],
                    )?
                } else {
                    db.execute(
                        "restore a ShedLock row",
                        &format!(
                            "UPDATE {t} AS s SET lock_until = r.lock_until, locked_at = r.locked_at, locked_by = r.locked_by
                               FROM jsonb_populate_record(NULL::{t}, $2::text::jsonb) AS r
                              WHERE s.name = $1 AND s.locked_by = $3"
                        ),
                        &[&name, &row.to_string(), &marker],
                    )?
                };
                if c > 0 {
                    ids.push(name);
                }
                n += c;
            }
            Ok((n, ids))
        }
        Gate::Quartz {
            table_prefix,
            scheduler,
            ..
        } => {
            let (tr, pg) = quartz_tables(table_prefix);
            let was_paused = strings(&prior["paused-groups"]);
            let added: Vec<String> = strings(&prior["groups"])
                .into_iter()
                .filter(|g| !was_paused.contains(g))
                .collect();
            db.execute(
                "resume Quartz groups",
                &format!("DELETE FROM {pg} WHERE sched_name = $1 AND trigger_group = ANY($2)"),
                &[scheduler, &added],
            )?;
            let (mut names, mut groups, mut states) = (Vec::new(), Vec::new(), Vec::new());
            for t in prior["triggers"].as_array().into_iter().flatten() {
                if let Some(s) = t["state"].as_str().and_then(resumed_state) {
                    names.push(t["name"].as_str().unwrap_or_default().to_owned());
                    groups.push(t["group"].as_str().unwrap_or_default().to_owned());
                    states.push(s.to_owned());
                }
            }
            let rows = db.query(
                "resume Quartz triggers",
                &format!(
                    "UPDATE {tr} AS t SET trigger_state = v.state
                       FROM unnest($2::text[], $3::text[], $4::text[]) AS v(name, grp, state)
                      WHERE t.sched_name = $1 AND t.trigger_name = v.name AND t.trigger_group = v.grp
                        AND t.trigger_state IN ('PAUSED', 'PAUSED_BLOCKED')
                      RETURNING t.trigger_group::text || '.' || t.trigger_name::text"
                ),
                &[scheduler, &names, &groups, &states],
            )?;
            let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            Ok((ids.len() as u64, ids))
        }
    }
}

/// What a close would change, from the state as it is.
fn would_close(gate: &Gate, state: &Value, database: &str) -> Effect {
    let (count, items, what) = match gate {
        Gate::SystemGate { name, table } => match state.get("enabled") {
            None => (
                1,
                vec![name.clone()],
                format!("{table} has no row `{name}`: insert it closed"),
            ),
            Some(Value::Bool(false)) => (0, vec![], format!("{table} `{name}` is already closed")),
            Some(v) => (
                1,
                vec![name.clone()],
                format!("{table} `{name}`: enabled {v} → false"),
            ),
        },
        Gate::Shedlock { table, .. } => {
            let locks = lock_rows(state);
            let names: Vec<String> = locks.keys().cloned().collect();
            let missing = locks.values().filter(|v| v.is_null()).count();
            let mut what = format!(
                "{table}: freeze {} lock(s) until {FROZEN_UNTIL}",
                names.len()
            );
            if missing > 0 {
                what.push_str(&format!(" ({missing} not there yet: inserted frozen)"));
            }
            (names.len() as u64, names, what)
        }
        Gate::Quartz { scheduler, .. } => {
            let moving: Vec<String> = state["triggers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["state"].as_str().and_then(resumed_state).is_some())
                .map(|t| {
                    format!(
                        "{}.{}",
                        t["group"].as_str().unwrap_or(""),
                        t["name"].as_str().unwrap_or("")
                    )
                })
                .collect();
            let groups = strings(&state["groups"]);
            (
                moving.len() as u64,
                moving.clone(),
                format!(
                    "Quartz {scheduler}: pause group(s) {}; {} trigger(s) to PAUSED",
                    groups.join(", "),
                    moving.len()
                ),
            )
        }
    };
    Effect {
        summary: format!("{what} on {database}"),
        count,
        items,
        detail: json!({"before": state}),
    }
}

impl Step for GateAt {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let db = env.db(&self.database)?;
        let state = read_state(db, &self.gate, false).on(&self.database)?;
        Ok(would_close(&self.gate, &state, &self.database))
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let marker = env.marker();
        let database = self.database.clone();
        let gate = &self.gate;
        env.db(&database)?.transaction("BEGIN", |db| {
            let prior = rec.prior(|| read_state(db, gate, true).on(&database))?;
            let (count, items) = close(db, gate, &prior, &marker).on(&database)?;
            let after = read_state(db, gate, false).on(&database)?;
            Ok(Effect {
                summary: format!("closed {} `{}` on {database}: {count} row(s) changed", gate.kind(), gate.name()),
                count,
                items,
                detail: json!({"gate": gate.name(), "type": gate.kind(), "database": database, "before": prior, "after": after}),
            })
        })
    }
}

impl Step for Reopen {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        Ok(Effect::said(format!(
            "restore {} `{}` on {} to the state {} journals",
            self.gate.kind(),
            self.gate.name(),
            self.database,
            self.close_step
        )))
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let Some(prior) = rec.prior_of(&self.close_step).cloned() else {
            return Err(StepError::Invalid(format!(
                "the journal holds no prior state from {}: this run did not close the gate, so it will not re-open it",
                self.close_step
            )));
        };
        let marker = env.marker();
        let database = self.database.clone();
        let gate = &self.gate;
        env.db(&database)?.transaction("BEGIN", |db| {
            let before = rec.prior(|| read_state(db, gate, true).on(&database))?;
            let (count, items) = reopen(db, gate, &prior, &marker).on(&database)?;
            let after = read_state(db, gate, false).on(&database)?;
            Ok(Effect {
                summary: format!("re-opened {} `{}` on {database}: {count} row(s) restored", gate.kind(), gate.name()),
                count,
                items,
                detail: json!({"gate": gate.name(), "type": gate.kind(), "database": database, "before": before, "after": after, "restored-to": prior}),
            })
        })
    }
}

impl Step for WaitCache {
    fn nature(&self) -> Nature {
        Nature::AfterClose
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        Ok(Effect::said(format!(
            "wait {} after the last close: the applications' gate cache TTL",
            humantime::format_duration(Duration::from_secs_f64(self.ttl_seconds))
        )))
    }

    fn apply(&self, _env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        // From the last close, not from now: a resumed run does not wait twice.
        let closed = self
            .after
            .iter()
            .filter_map(|s| rec.done_at(s))
            .max()
            .unwrap_or_else(SystemTime::now);
        let deadline = closed + Duration::from_secs_f64(self.ttl_seconds);
        rec.sleep_until(deadline)?;
        Ok(Effect::said(format!(
            "waited until {} (gate cache TTL {}s)",
            humantime::format_rfc3339_millis(deadline),
            self.ttl_seconds
        )))
    }
}

impl Step for Verify {
    fn nature(&self) -> Nature {
        Nature::AfterClose
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        Ok(Effect::said(format!(
            "check that all {} close(s) still hold; close again any a holder released",
            self.closed.len()
        )))
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let marker = env.marker();
        let (mut count, mut items) = (0, Vec::new());
        for c in &self.closed {
            let prior = rec.prior_of(&c.step).cloned().ok_or_else(|| {
                StepError::Invalid(format!("the journal holds no prior state from {}", c.step))
            })?;
            let database = c.at.database.clone();
            let (n, ids) = env.db(&database)?.transaction("BEGIN", |db| {
                close(db, &c.at.gate, &prior, &marker).on(&database)
            })?;
            if n > 0 {
                items.extend(
                    ids.into_iter()
                        .map(|i| format!("{}@{database}: {i}", c.at.gate.name())),
                );
            }
            count += n;
        }
        let summary = if count == 0 {
            format!("all {} close(s) still hold", self.closed.len())
        } else {
            format!("closed again {count} row(s) released since the close: a job or a person reopened them; the probe shows whether anything ran")
        };
        Ok(Effect {
            summary,
            count,
            items,
            detail: Value::Null,
        })
    }
}
