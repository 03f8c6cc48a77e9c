//! The evidence report, built from a run directory alone (the plan and the
//! journal): the recovery target, a timeline of the steps, what each one
//! changed, the gates before and after, and the validation results. As
//! JSON for scripts, Markdown for tickets, and one self-contained HTML file
//! with a timeline picture for people.
//!
//! Two files from outside reentry join it when the run directory has them:
//! `checks.json`, the verdicts of the team's own checks (an oracle, a
//! reconciliation job), and `observations.jsonl`, what the application saw
//! during the run (requests refused while a gate was closed, counts), put
//! on the timeline.

use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::reentry::journal::{self, Entry, Event, Record};
use crate::reentry::plan::{Plan, PlaybookRef, TargetInfo, PLAN_FILE};
use crate::reentry::steps::{GateRow, Phase};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {} (is this a run directory from `reentry apply`?)", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Bad {
        path: std::path::PathBuf,
        why: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    Done,
    Failed,
    Skipped,
    /// Started, never finished: the run died or was interrupted in it.
    Unfinished,
    NotRun,
}

impl StepStatus {
    fn label(self) -> &'static str {
        match self {
            StepStatus::Done => "done",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Unfinished => "unfinished",
            StepStatus::NotRun => "not run",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StepEvidence {
    pub n: usize,
    pub id: String,
    pub phase: Phase,
    pub title: String,
    pub status: StepStatus,
    /// How many times the step started (more than one: resumed after a crash).
    pub attempts: usize,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Seconds from the start of the run.
    pub offset: Option<f64>,
    pub seconds: Option<f64>,
    pub summary: String,
    pub count: u64,
    pub items: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PauseEvidence {
    pub after: Phase,
    pub at: String,
    pub resumed_at: Option<String>,
    pub seconds: Option<f64>,
}

pub use crate::reentry::steps::GateEvidence;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub run_id: String,
    pub mode: String,
    pub status: String,
    pub playbook: PlaybookRef,
    pub target: TargetInfo,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub seconds: f64,
    /// Starts of the run: 1, plus one per resume after a failure or a
    /// crash (a resume after a pause is the same attempt going on).
    pub attempts: usize,
    /// Holds asked for with `apply --until`.
    pub pauses: Vec<PauseEvidence>,
    pub steps: Vec<StepEvidence>,
    pub gates: Vec<GateEvidence>,
    /// The kinds' own tables (rows repaired, …), in plan order.
    pub sections: Vec<Section>,
    pub notes: Vec<String>,
    /// `checks.json`, when the run directory has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<Checks>,
    /// `observations.jsonl`, in time order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<Observation>,
}

/// The team's own checks of the world after re-entry (`checks.json`):
/// properties, each with a result per column (e.g. "after the restore",
/// "after re-entry"); a result may be missing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// Who checked (a program, a person).
    pub source: String,
    pub columns: Vec<String>,
    pub rows: Vec<CheckRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRow {
    pub property: String,
    pub results: Vec<Option<CheckResult>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckResult {
    pub pass: bool,
    #[serde(default)]
    pub detail: String,
}

/// Something seen outside reentry during the run (`observations.jsonl`,
/// one JSON object per line): `at` (RFC 3339), optionally `until`, who
/// saw it, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Observation {
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub source: String,
    pub what: String,
    /// Seconds from the start of the run (negative: before it).
    #[serde(default, skip_deserializing)]
    pub offset: f64,
    #[serde(default, skip_deserializing)]
    pub seconds: f64,
}

pub const CHECKS_FILE: &str = "checks.json";
pub const OBSERVATIONS_FILE: &str = "observations.jsonl";

/// The outside files of a run directory, when there.
fn outside(dir: &Path, r: &mut Report) -> Result<(), ReportError> {
    let path = dir.join(CHECKS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let c: Checks = serde_json::from_str(&text).map_err(|e| ReportError::Bad {
                path: path.clone(),
                why: format!("line {}, column {}: {e}", e.line(), e.column()),
            })?;
            if let Some(row) = c.rows.iter().find(|x| x.results.len() != c.columns.len()) {
                return Err(ReportError::Bad {
                    path,
                    why: format!(
                        "property `{}` has {} result(s) for {} column(s)",
                        row.property,
                        row.results.len(),
                        c.columns.len()
                    ),
                });
            }
            r.checks = Some(c);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ReportError::Read { path, source }),
    }
    let path = dir.join(OBSERVATIONS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ReportError::Read { path, source }),
    };
    let t0 = r.started_at.parse::<jiff::Timestamp>().ok();
    let time = |s: &str, n: usize| -> Result<jiff::Timestamp, ReportError> {
        s.parse().map_err(|e| ReportError::Bad {
            path: path.clone(),
            why: format!("line {n}: `{s}` is not an RFC 3339 time: {e}"),
        })
    };
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut o: Observation = serde_json::from_str(line).map_err(|e| ReportError::Bad {
            path: path.clone(),
            why: format!("line {}: {e}", i + 1),
        })?;
        let at = time(&o.at, i + 1)?;
        let until = o.until.as_deref().map(|u| time(u, i + 1)).transpose()?;
        if let Some(t0) = t0 {
            o.offset = at.duration_since(t0).as_secs_f64();
        }
        o.seconds = until.map_or(0.0, |u| u.duration_since(at).as_secs_f64().max(0.0));
        r.observations.push(o);
    }
    r.observations.sort_by(|a, b| a.offset.total_cmp(&b.offset));
    Ok(())
}

/// A kind's own table in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Section {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub lines: Vec<String>,
}

fn secs_between(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<f64> {
    Some(b?.duration_since(a?).ok()?.as_secs_f64())
}

/// Reads a run directory and builds the evidence.
pub fn build(dir: &Path) -> Result<Report, ReportError> {
    let plan_path = dir.join(PLAN_FILE);
    let text = std::fs::read_to_string(&plan_path).map_err(|source| ReportError::Read {
        path: plan_path.clone(),
        source,
    })?;
    let plan: Plan = serde_json::from_str(&text).map_err(|e| ReportError::Bad {
        path: plan_path.clone(),
        why: format!("not a reentry plan: {e}"),
    })?;
    let jpath = dir.join(journal::JOURNAL);
    let (records, _) = journal::read_records(&jpath).map_err(|source| ReportError::Read {
        path: jpath.clone(),
        source,
    })?;
    let mut r = assemble(&plan, &records);
    outside(dir, &mut r)?;
    Ok(r)
}

pub fn assemble(plan: &Plan, records: &[Record]) -> Report {
    let first = records.first();
    let t0 = first.and_then(Record::time);
    let (run_id, mode) = match first.map(|r| &r.entry) {
        Some(Entry::RunStarted(r)) => (r.run_id.clone(), r.mode.clone()),
        _ => ("?".into(), "?".into()),
    };
    let last = records.last();
    let status = match last.map(Record::event) {
        Some(Event::RunFinished) => "finished",
        Some(Event::Paused) => "paused (as asked; continue with --resume)",
        Some(Event::Interrupted) => "interrupted",
        _ if records
            .iter()
            .rev()
            .find(|r| r.step.is_some())
            .map(Record::event)
            == Some(Event::Failed) =>
        {
            "failed"
        }
        _ => "incomplete (the run died or is still going; resume it with --resume)",
    };
    let mut steps = Vec::new();
    let mut gates: Vec<GateEvidence> = Vec::new();
    let mut sections: Vec<Section> = Vec::new();
    for (i, s) in plan.steps.iter().enumerate() {
        let mine: Vec<&Record> = records
            .iter()
            .filter(|r| r.step.as_deref() == Some(s.id.as_str()))
            .collect();
        let started: Vec<&&Record> = mine
            .iter()
            .filter(|r| r.event() == Event::Started)
            .collect();
        let end = mine
            .iter()
            .rev()
            .find(|r| matches!(r.event(), Event::Done | Event::Failed | Event::Skipped));
        let start_time = started.last().and_then(|r| r.time());
        let end_time = end.and_then(|r| r.time());
        let status = match end.map(|r| r.event()) {
            Some(Event::Done) => StepStatus::Done,
            Some(Event::Failed) => StepStatus::Failed,
            Some(Event::Skipped) => StepStatus::Skipped,
            _ if !started.is_empty() => StepStatus::Unfinished,
            _ => StepStatus::NotRun,
        };
        let (mut summary, mut count, mut items) = (s.preview.summary.clone(), 0, Vec::new());
        let (mut error, mut findings) = (None, Vec::new());
        match end.map(|r| &r.entry) {
            Some(Entry::Done(d)) => {
                (summary, count, items) = (
                    d.effect.summary.clone(),
                    d.effect.count,
                    d.effect.items.clone(),
                );
                if let Some(e) = s.action.step().evidence(&d.effect) {
                    match sections
                        .iter_mut()
                        .find(|x: &&mut Section| x.title == e.section)
                    {
                        Some(sec) => {
                            sec.rows.push(e.row);
                            sec.lines.extend(e.lines);
                        }
                        None => sections.push(Section {
                            title: e.section,
                            columns: e.columns,
                            rows: vec![e.row],
                            lines: e.lines,
                        }),
                    }
                }
                // The kind says what its effect means for a gate.
                match s.action.step().gate_evidence(&d.effect) {
                    Some(GateRow::Closed(row)) => gates.push(row),
                    Some(GateRow::Reopened {
                        gate,
                        database,
                        after,
                    }) => {
                        if let Some(row) = gates
                            .iter_mut()
                            .find(|x| x.gate == gate && x.database == database)
                        {
                            row.after = after;
                        }
                    }
                    None => {}
                }
            }
            Some(Entry::Skipped(k)) => {
                (summary, count, items) = (k.why.clone(), s.preview.count, s.preview.items.clone());
            }
            Some(Entry::Failed(f)) => {
                error = Some(f.error.clone());
                findings = f.findings.clone();
            }
            _ => {}
        }
        steps.push(StepEvidence {
            n: i + 1,
            id: s.id.clone(),
            phase: s.phase,
            title: s.title.clone(),
            status,
            attempts: started.len(),
            started_at: started.last().map(|r| r.at.clone()),
            finished_at: end.map(|r| r.at.clone()),
            offset: secs_between(t0, start_time.or(end_time)),
            seconds: secs_between(start_time.or(end_time), end_time),
            summary,
            count,
            items,
            error,
            findings,
        });
    }
    let end_time = last.and_then(Record::time);
    Report {
        run_id,
        mode,
        status: status.to_owned(),
        playbook: plan.playbook.clone(),
        target: plan.target.clone(),
        started_at: first.map(|r| r.at.clone()).unwrap_or_default(),
        finished_at: last
            .filter(|r| r.event() == Event::RunFinished)
            .map(|r| r.at.clone()),
        seconds: secs_between(t0, end_time).unwrap_or(0.0),
        attempts: records
            .iter()
            .filter(|r| match &r.entry {
                Entry::RunStarted(_) => true,
                Entry::Resumed(x) => !x.after_pause,
                _ => false,
            })
            .count(),
        pauses: pauses(records),
        steps,
        gates,
        sections,
        notes: plan.notes.clone(),
        checks: None,
        observations: Vec::new(),
    }
}

fn pauses(records: &[Record]) -> Vec<PauseEvidence> {
    let mut out: Vec<PauseEvidence> = Vec::new();
    for r in records {
        match &r.entry {
            Entry::Paused(p) => {
                out.push(PauseEvidence {
                    after: p.after,
                    at: r.at.clone(),
                    resumed_at: None,
                    seconds: None,
                });
            }
            Entry::Resumed(_) => {
                if let Some(p) = out.last_mut().filter(|p| p.resumed_at.is_none()) {
                    p.seconds = secs_between(humantime::parse_rfc3339(&p.at).ok(), r.time());
                    p.resumed_at = Some(r.at.clone());
                }
            }
            _ => {}
        }
    }
    out
}

fn describe_pause(p: &PauseEvidence) -> String {
    match (&p.resumed_at, p.seconds) {
        (Some(at), Some(s)) => format!(
            "held after the {} phase from {} to {at} ({s:.1} s), as asked with --until",
            p.after.label(),
            p.at
        ),
        _ => format!(
            "held after the {} phase since {}, as asked with --until; not resumed yet",
            p.after.label(),
            p.at
        ),
    }
}

/// Text from a run (database rows, server messages) as Markdown that
/// shows it and does nothing else: no table cell ends, and no HTML, link,
/// image or code span starts, whatever renders the report (ticket
/// systems that allow raw HTML or `javascript:` links among them).
fn md_cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '|' | '[' | ']' | '`' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Text inside a code span, where nothing is interpreted but a backtick
/// (which would end it) and, in a table, `|`.
fn md_code(s: &str) -> String {
    s.replace('`', "'")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Re-entry report: {}", md_cell(&r.playbook.name));
    let _ = writeln!(o);
    let _ = writeln!(o, "- Run: `{}` ({}), **{}**", r.run_id, r.mode, r.status);
    let _ = writeln!(o, "- Way back: {}", r.playbook.way_back);
    let _ = writeln!(o, "- Recovery target: {}", md_cell(&r.target.describe()));
    let _ = writeln!(
        o,
        "- Started {}, {}; {:.1} s; {} attempt(s)",
        r.started_at,
        r.finished_at
            .as_deref()
            .map_or("not finished".to_owned(), |f| format!("finished {f}")),
        r.seconds,
        r.attempts
    );
    for p in &r.pauses {
        let _ = writeln!(o, "- Paused: {}", describe_pause(p));
    }
    let _ = writeln!(
        o,
        "- Playbook: `{}` (sha256 {:.12})",
        r.playbook.file, r.playbook.sha256
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "## Timeline");
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| # | step | phase | status | at (s) | took (s) | changed | what |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for s in &r.steps {
        let mut what = md_cell(s.error.as_deref().unwrap_or(&s.summary));
        if !s.items.is_empty() {
            what.push_str(&format!(" ({})", md_cell(&s.items.join(", "))));
        }
        let _ = writeln!(
            o,
            "| {} | `{}` | {} | {}{} | {} | {} | {} | {} |",
            s.n,
            md_code(&s.id),
            s.phase.label(),
            s.status.label(),
            if s.attempts > 1 {
                format!(" ({} attempts)", s.attempts)
            } else {
                String::new()
            },
            s.offset.map_or("".into(), |x| format!("{x:.2}")),
            s.seconds.map_or("".into(), |x| format!("{x:.3}")),
            s.count,
            what
        );
    }
    // What a failed step outside validation found (validation has its own
    // section below): a gate that does not hold, jobs still running.
    for st in r
        .steps
        .iter()
        .filter(|x| x.phase != Phase::Validate && !x.findings.is_empty())
    {
        let _ = writeln!(o);
        let _ = writeln!(o, "`{}` found:", md_code(&st.id));
        let _ = writeln!(o);
        for f in st.findings.iter().take(20) {
            let _ = writeln!(o, "- {}", md_cell(f));
        }
    }
    if !r.observations.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "Seen outside reentry meanwhile:");
        let _ = writeln!(o);
        let _ = writeln!(o, "| at (s) | for (s) | who | what |");
        let _ = writeln!(o, "|---|---|---|---|");
        for x in &r.observations {
            let _ = writeln!(
                o,
                "| {:.2} | {} | {} | {} |",
                x.offset,
                if x.seconds > 0.0 {
                    format!("{:.2}", x.seconds)
                } else {
                    String::new()
                },
                md_cell(&x.source),
                md_cell(&x.what)
            );
        }
    }
    if let Some(c) = &r.checks {
        let _ = writeln!(o);
        let _ = writeln!(o, "## Checks by {}", md_cell(&c.source));
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| property | {} |",
            c.columns
                .iter()
                .map(|x| md_cell(x))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(o, "|---|{}", "---|".repeat(c.columns.len()));
        for row in &c.rows {
            let cells: Vec<String> = row
                .results
                .iter()
                .map(|x| md_cell(&verdict(x.as_ref())))
                .collect();
            let _ = writeln!(o, "| {} | {} |", md_cell(&row.property), cells.join(" | "));
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "## Gates");
    let _ = writeln!(o);
    if r.gates.is_empty() {
        let _ = writeln!(o, "No gate was closed.");
    } else {
        let _ = writeln!(o, "| gate | type | database | before | closed | after |");
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        for g in &r.gates {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                md_cell(&g.gate),
                g.kind,
                g.database,
                md_cell(&g.before),
                md_cell(&g.closed),
                md_cell(&g.after)
            );
        }
    }
    for sec in &r.sections {
        let _ = writeln!(o);
        let _ = writeln!(o, "## {}", sec.title);
        let _ = writeln!(o);
        let _ = writeln!(o, "| {} |", sec.columns.join(" | "));
        let _ = writeln!(o, "|{}", "---|".repeat(sec.columns.len()));
        for row in &sec.rows {
            let cells: Vec<String> = row.iter().map(|c| md_cell(c)).collect();
            let _ = writeln!(o, "| {} |", cells.join(" | "));
        }
        if !sec.lines.is_empty() {
            let _ = writeln!(o);
            for l in &sec.lines {
                let _ = writeln!(o, "- {}", md_cell(l));
            }
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "## Validation");
    let _ = writeln!(o);
    for s in r.steps.iter().filter(|s| s.phase == Phase::Validate) {
        let _ = writeln!(
            o,
            "- **{}** `{}`: {}",
            s.status.label(),
            md_cell(&s.id),
            md_cell(s.error.as_deref().unwrap_or(&s.summary))
        );
        for f in s.findings.iter().take(20) {
            let _ = writeln!(o, "  - {}", md_cell(f));
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "## Notes");
        let _ = writeln!(o);
        for n in &r.notes {
            let _ = writeln!(o, "- {}", md_cell(n));
        }
    }
    o
}

/// A check's result as a cell: `ok` or `FAIL`, with its detail.
fn verdict(x: Option<&CheckResult>) -> String {
    match x {
        None => "-".into(),
        Some(c) if c.detail.is_empty() => (if c.pass { "ok" } else { "FAIL" }).into(),
        Some(c) => format!("{}: {}", if c.pass { "ok" } else { "FAIL" }, c.detail),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// At most `n` characters, with an ellipsis when cut.
fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(n - 1).collect();
    t.push('…');
    t
}

fn phase_colour(p: Phase) -> &'static str {
    match p {
        Phase::CloseGates => "#c2410c",
        Phase::Settle => "#a16207",
        Phase::Repair => "#be185d",
        Phase::Validate => "#1d4ed8",
        Phase::Reconcile => "#7c3aed",
        Phase::Reopen => "#15803d",
    }
}

/// The timeline: one bar per step on a shared time axis, the span with the
/// gates closed shaded behind them.
fn timeline_svg(r: &Report) -> String {
    let rows: Vec<&StepEvidence> = r.steps.iter().filter(|s| s.offset.is_some()).collect();
    let total = r
        .steps
        .iter()
        .filter_map(|s| Some(s.offset? + s.seconds.unwrap_or(0.0)))
        .fold(r.seconds, f64::max)
        .max(0.001);
    // What the application saw, on one more row, within the run.
    let seen: Vec<&Observation> = r
        .observations
        .iter()
        .filter(|o| o.offset + o.seconds >= 0.0 && o.offset <= total)
        .collect();
    let extra = usize::from(!seen.is_empty());
    let (label_w, plot_w, row_h, top) = (260.0, 640.0, 22.0, 30.0);
    let height = top + row_h * (rows.len() + extra) as f64 + 52.0;
    let x = |t: f64| label_w + plot_w * (t / total);
    let mut o = String::new();
    let _ = write!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {height}\" width=\"100%\" role=\"img\" aria-label=\"timeline of the run\" font-family=\"system-ui, sans-serif\" font-size=\"12\">",
        w = label_w + plot_w + 20.0
    );
    // Gates closed: from the first close to the last re-open (or the end).
    let first_close = rows
        .iter()
        .filter(|s| s.phase == Phase::CloseGates)
        .filter_map(|s| s.offset)
        .fold(f64::INFINITY, f64::min);
    if first_close.is_finite() {
        let reopened = rows
            .iter()
            .filter(|s| s.phase == Phase::Reopen && s.status == StepStatus::Done)
            .filter_map(|s| Some(s.offset? + s.seconds.unwrap_or(0.0)))
            .fold(f64::NEG_INFINITY, f64::max);
        let end = if reopened.is_finite() {
            reopened
        } else {
            total
        };
        let _ = write!(
            o,
            "<rect x=\"{:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#fde68a\" opacity=\"0.45\"><title>gates closed: {:.2} s</title></rect><text x=\"{:.1}\" y=\"{}\" fill=\"#92400e\">gates closed ({:.1} s)</text>",
            x(first_close),
            top - 6.0,
            (x(end) - x(first_close)).max(2.0),
            row_h * rows.len() as f64 + 6.0,
            end - first_close,
            x(first_close) + 4.0,
            top - 10.0,
            end - first_close
        );
    }
    for (i, s) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let start = s.offset.unwrap_or(0.0);
        let w = (x(start + s.seconds.unwrap_or(0.0)) - x(start)).max(3.0);
        let fill = match s.status {
            StepStatus::Failed => "#b91c1c",
            StepStatus::Unfinished => "#6b7280",
            StepStatus::Skipped => "#d1d5db",
            _ => phase_colour(s.phase),
        };
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" rx=\"2\" fill=\"{fill}\"><title>{}: {} at {:.2} s, {:.3} s — {}</title></rect>",
            label_w - 8.0,
            y + row_h * 0.65,
            esc(&short(&s.id, 40)),
            x(start),
            y + 3.0,
            row_h - 6.0,
            esc(&s.id),
            s.status.label(),
            start,
            s.seconds.unwrap_or(0.0),
            esc(s.error.as_deref().unwrap_or(&s.summary))
        );
    }
    if !seen.is_empty() {
        let y = top + row_h * rows.len() as f64;
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-style=\"italic\">seen outside reentry</text>",
            label_w - 8.0,
            y + row_h * 0.65
        );
        for s in &seen {
            let start = s.offset.max(0.0);
            let end = (s.offset + s.seconds).min(total);
            let _ = write!(
                o,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#0891b2\"><title>{} at {:.2} s: {}</title></rect>",
                x(start),
                y + 3.0,
                (x(end) - x(start)).max(2.0),
                row_h - 6.0,
                esc(&s.source),
                s.offset,
                esc(&s.what)
            );
        }
    }
    let axis_y = top + row_h * (rows.len() + extra) as f64 + 14.0;
    let mut lx = label_w;
    for (p, name) in [
        (Phase::CloseGates, "close gates"),
        (Phase::Settle, "settle"),
        (Phase::Repair, "repair rows"),
        (Phase::Validate, "validate"),
        (Phase::Reconcile, "reconcile"),
        (Phase::Reopen, "re-open"),
    ] {
        let _ = write!(
            o,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{name}</text>",
            axis_y + 10.0,
            phase_colour(p),
            lx + 14.0,
            axis_y + 19.0
        );
        lx += 100.0;
    }
    for k in 0..=4 {
        let t = total * k as f64 / 4.0;
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{axis_y:.1}\" text-anchor=\"middle\" fill=\"#555\">{t:.1} s</text>",
            x(t)
        );
    }
    o.push_str("</svg>");
    o
}

pub fn html(r: &Report) -> String {
    let mut o = String::new();
    let badge = match r.status.as_str() {
        "finished" => "#15803d",
        "failed" => "#b91c1c",
        _ => "#a16207",
    };
    let _ = write!(
        o,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Re-entry report: {name}</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#111}}\
table{{border-collapse:collapse;width:100%;margin:1em 0}}td,th{{border-bottom:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top;font-size:14px}}\
.badge{{color:#fff;background:{badge};padding:2px 8px;border-radius:4px}}code{{font-size:13px}}.err{{color:#b91c1c}}\
dl{{display:grid;grid-template-columns:max-content auto;gap:4px 16px}}dt{{color:#555}}\
td.ok{{background:#dcfce7}}td.fail{{background:#fee2e2}}td.ok b{{color:#15803d}}td.fail b{{color:#b91c1c}}</style></head><body>",
        name = esc(&r.playbook.name)
    );
    let _ = write!(
        o,
        "<h1>Re-entry: {} <span class=\"badge\">{}</span></h1><dl><dt>run</dt><dd><code>{}</code> ({})</dd><dt>way back</dt><dd>{}</dd><dt>recovery target</dt><dd>{}</dd><dt>started</dt><dd>{}</dd><dt>finished</dt><dd>{}</dd><dt>duration</dt><dd>{:.1} s, {} attempt(s)</dd><dt>playbook</dt><dd><code>{}</code> sha256 {:.12}</dd></dl>",
        esc(&r.playbook.name),
        esc(&r.status),
        esc(&r.run_id),
        esc(&r.mode),
        r.playbook.way_back,
        esc(&r.target.describe()),
        esc(&r.started_at),
        esc(r.finished_at.as_deref().unwrap_or("not finished")),
        r.seconds,
        r.attempts,
        esc(&r.playbook.file),
        esc(&r.playbook.sha256)
    );
    for p in &r.pauses {
        let _ = write!(o, "<p><b>Paused:</b> {}</p>", esc(&describe_pause(p)));
    }
    o.push_str("<h2>Timeline</h2>");
    o.push_str(&timeline_svg(r));
    o.push_str("<table><tr><th>#</th><th>step</th><th>status</th><th>at</th><th>took</th><th>changed</th><th>what</th></tr>");
    for s in &r.steps {
        let what = match &s.error {
            Some(e) => format!("<span class=\"err\">{}</span>", esc(e)),
            None => esc(&s.summary),
        };
        let items = if s.items.is_empty() {
            String::new()
        } else {
            format!("<br><small>{}</small>", esc(&s.items.join(", ")))
        };
        let _ = write!(
            o,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{what}{items}</td></tr>",
            s.n,
            esc(&s.id),
            s.status.label(),
            if s.attempts > 1 { format!(" ({} attempts)", s.attempts) } else { String::new() },
            s.offset.map_or(String::new(), |x| format!("{x:.2} s")),
            s.seconds.map_or(String::new(), |x| format!("{x:.3} s")),
            s.count
        );
    }
    o.push_str("</table>");
    if !r.observations.is_empty() {
        o.push_str("<h3>Seen outside reentry meanwhile</h3><table class=\"seen\"><tr><th>at</th><th>for</th><th>who</th><th>what</th></tr>");
        for x in &r.observations {
            let _ = write!(
                o,
                "<tr><td>{:.2} s</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                x.offset,
                if x.seconds > 0.0 {
                    format!("{:.2} s", x.seconds)
                } else {
                    String::new()
                },
                esc(&x.source),
                esc(&x.what)
            );
        }
        o.push_str("</table>");
    }
    if let Some(c) = &r.checks {
        let _ = write!(
            o,
            "<h2>Checks by {}</h2><table class=\"checks\"><tr><th>property</th>",
            esc(&c.source)
        );
        for col in &c.columns {
            let _ = write!(o, "<th>{}</th>", esc(col));
        }
        o.push_str("</tr>");
        for row in &c.rows {
            let _ = write!(o, "<tr><td>{}</td>", esc(&row.property));
            for x in &row.results {
                let (class, word) = match x {
                    None => ("", "-"),
                    Some(c) if c.pass => ("ok", "ok"),
                    Some(_) => ("fail", "FAIL"),
                };
                let detail = x.as_ref().map_or(String::new(), |c| esc(&c.detail));
                let _ = write!(
                    o,
                    "<td class=\"{class}\"><b>{word}</b> <small>{detail}</small></td>"
                );
            }
            o.push_str("</tr>");
        }
        o.push_str("</table>");
    }
    for st in r
        .steps
        .iter()
        .filter(|x| x.phase != Phase::Validate && !x.findings.is_empty())
    {
        let _ = write!(o, "<p><code>{}</code> found:</p><ul>", esc(&st.id));
        for f in st.findings.iter().take(20) {
            let _ = write!(o, "<li>{}</li>", esc(f));
        }
        o.push_str("</ul>");
    }
    o.push_str("<h2>Gates</h2>");
    if r.gates.is_empty() {
        o.push_str("<p>No gate was closed.</p>");
    } else {
        o.push_str("<table><tr><th>gate</th><th>database</th><th>before</th><th>closed</th><th>after</th></tr>");
        for g in &r.gates {
            let _ = write!(
                o,
                "<tr><td>{} <small>{}</small></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&g.gate),
                esc(&g.kind),
                esc(&g.database),
                esc(&g.before),
                esc(&g.closed),
                esc(&g.after)
            );
        }
        o.push_str("</table>");
    }
    for sec in &r.sections {
        let _ = write!(o, "<h2>{}</h2><table><tr>", esc(&sec.title));
        for c in &sec.columns {
            let _ = write!(o, "<th>{}</th>", esc(c));
        }
        o.push_str("</tr>");
        for row in &sec.rows {
            o.push_str("<tr>");
            for c in row {
                let _ = write!(o, "<td>{}</td>", esc(c));
            }
            o.push_str("</tr>");
        }
        o.push_str("</table>");
        if !sec.lines.is_empty() {
            o.push_str("<ul>");
            for l in &sec.lines {
                let _ = write!(o, "<li>{}</li>", esc(l));
            }
            o.push_str("</ul>");
        }
    }
    o.push_str("<h2>Validation</h2><ul>");
    for s in r.steps.iter().filter(|s| s.phase == Phase::Validate) {
        let _ = write!(
            o,
            "<li><b>{}</b> <code>{}</code>: {}",
            s.status.label(),
            esc(&s.id),
            esc(s.error.as_deref().unwrap_or(&s.summary))
        );
        if !s.findings.is_empty() {
            o.push_str("<ul>");
            for f in s.findings.iter().take(20) {
                let _ = write!(o, "<li>{}</li>", esc(f));
            }
            o.push_str("</ul>");
        }
        o.push_str("</li>");
    }
    o.push_str("</ul>");
    if !r.notes.is_empty() {
        o.push_str("<h2>Notes</h2><ul>");
        for n in &r.notes {
            let _ = write!(o, "<li>{}</li>", esc(n));
        }
        o.push_str("</ul>");
    }
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_what_playbooks_and_databases_wrote() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(md_cell("a|b\nc"), "a\\|b c");
    }

    #[test]
    fn markdown_shows_html_links_and_code_from_a_run_as_text() {
        assert_eq!(
            md_cell("<img src=x onerror=alert(1)> & [click](javascript:alert(1)) `x`"),
            "&lt;img src=x onerror=alert(1)&gt; &amp; \\[click\\](javascript:alert(1)) \\`x\\`"
        );
        // A backslash cannot escape the cell's end.
        assert_eq!(md_cell("a\\|b"), "a\\\\\\|b");
        assert_eq!(md_code("a`b|c"), "a'b\\|c");
    }
}
