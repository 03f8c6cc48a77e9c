//! Apply: walks the plan step by step, journaling each before and after its
//! side effect. A dry run is the same loop with the changes skipped (and
//! every session read-only on the server). `--resume` continues a run that
//! died from the plan it started with: finished steps are skipped, a step
//! that started but never finished runs again, which its idempotence makes
//! safe, against the prior state journaled the first time.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fsutil;
use crate::reentry::journal::{self, Entry, Event, Journal, Record, State};
use crate::reentry::plan::{self, Plan, PlanError, PlannedStep, PLAN_FILE};
use crate::reentry::playbook::{Playbook, WayBack};
use crate::reentry::steps::{pause_point, Effect, Env, Nature, Phase, Recorder, StepError};

pub struct Options {
    pub run_dir: PathBuf,
    pub apply: bool,
    pub resume: bool,
    /// Stop after this phase (journaled as a pause); `resume` goes on.
    pub until: Option<Phase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Done,
    /// Finished by an earlier attempt of this run.
    AlreadyDone,
    /// Dry run: a change not made, or a step that needs closed gates.
    Skipped,
    Failed,
    /// Dry run: a check that fails now.
    WouldFail,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepLine {
    pub id: String,
    pub title: String,
    pub outcome: Outcome,
    pub summary: String,
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Finished,
    /// Stopped on purpose after `until`: resume to go on.
    Paused,
    Failed,
    Interrupted,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunResult {
    pub run_id: String,
    pub run_dir: String,
    pub mode: &'static str,
    pub resumed: bool,
    pub status: Status,
    pub steps: Vec<StepLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The step that stopped the run refused to protect data (exit 3), as
    /// opposed to failing (exit 2).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

impl RunResult {
    pub fn would_fail(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.outcome == Outcome::WouldFail)
            .count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "run directory {dir} already holds {what}: use a new directory, or --resume to continue it"
    )]
    NotEmpty { dir: String, what: String },
    #[error("run directory {dir} is in use by another `reentry apply`")]
    Locked { dir: String },
    #[error("{dir} holds no run to resume ({why}); start one without --resume")]
    NothingToResume { dir: String, why: String },
    #[error("{dir} holds a dry run: there is nothing to resume; start the real run in a new directory with --apply")]
    DryRun { dir: String },
    #[error(
        "{dir} holds a real run: resume it with --apply --resume, a dry run cannot continue it"
    )]
    NotDryRun { dir: String },
    #[error("the playbook changed since this run started (sha256 {then:.12} → {now:.12}): a resumed run walks the plan it started with, so put the playbook back as it was, or start a new run")]
    PlaybookChanged { then: String, now: String },
    #[error("{} is not the plan this run wrote (sha256 {then:.12} → {now:.12}): a resumed run walks only its own plan; put the file back, or start a new run in an empty directory", path.display())]
    PlanChanged {
        path: PathBuf,
        then: String,
        now: String,
    },
    #[error("this run is a {then}, and it was resumed as a {now}: resume it without --way-back, or with --way-back {then}")]
    WayBackChanged { then: WayBack, now: WayBack },
    #[error("run directory {dir} is not safe to run from: {why}. Whoever can write there can replace the plan a resumed run walks; use a directory of your own, mode 0700")]
    UnsafeDir { dir: String, why: String },
    #[error("{dir}'s journal records no sha256 of its plan (an older reentry started it), so the plan cannot be checked before it runs again: finish it with the build that started it, or start a new run in an empty directory. A new run refuses while that build's staging tables hold rows (public.reentry_orphan_event, reentry_idempotency_review, reentry_idempotency_tombstone, reentry_repair tables with _run_id): it would stage those orphans again and re-send their compensating events; check and move them out of the way first")]
    PlanUnchecked { dir: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RunError {
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            RunError::NotEmpty { .. }
            | RunError::NothingToResume { .. }
            | RunError::DryRun { .. }
            | RunError::NotDryRun { .. } => Exit::Usage,
            RunError::Locked { .. }
            | RunError::PlaybookChanged { .. }
            | RunError::PlanChanged { .. }
            | RunError::WayBackChanged { .. }
            | RunError::UnsafeDir { .. }
            | RunError::PlanUnchecked { .. } => Exit::Refused,
            RunError::Plan(e) => e.exit(),
            RunError::Io { .. } => Exit::Failure,
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RunError + 'a {
    move |source| RunError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn new_run_id() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let compact: String = t.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("{compact}-{}", std::process::id())
}

/// A run about to walk its plan.
struct Opened {
    plan: Plan,
    journal: Journal,
    records: Vec<Record>,
    run_id: String,
    resumed: bool,
    _lock: fs::File,
}

fn take_lock(dir: &Path) -> Result<fs::File, RunError> {
    journal::lock(dir)
        .map_err(io("cannot lock", dir))?
        .ok_or_else(|| RunError::Locked {
            dir: dir.display().to_string(),
        })
}

/// Refuses a run directory holding anything but the lock.
fn check_empty(dir: &Path) -> Result<(), RunError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    if entries.flatten().any(|e| e.file_name() != "lock") {
        let what = if dir.join(journal::JOURNAL).exists() {
            "a run".to_owned()
        } else {
            "other files".to_owned()
        };
        return Err(RunError::NotEmpty {
            dir: dir.display().to_string(),
            what,
        });
    }
    Ok(())
}

/// A run directory must be this user's own, and writable by nobody else:
/// whoever can write there can replace `plan.json` and the journal that
/// vouches for it together.
fn check_own(dir: &Path) -> Result<(), RunError> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(dir).map_err(io("cannot read", dir))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let why = if m.uid() != me {
        format!("it belongs to uid {}, not to this user (uid {me})", m.uid())
    } else if m.mode() & 0o022 != 0 {
        format!("others can write to it (mode {:o})", m.mode() & 0o777)
    } else {
        return Ok(());
    };
    Err(RunError::UnsafeDir {
        dir: dir.display().to_string(),
        why,
    })
}

fn start(p: &Playbook, opts: &Options) -> Result<Opened, RunError> {
    let dir = &opts.run_dir;
    // Checked before creating the lock, so a wrong --run-dir is left as it
    // was, and again under it: two starts on one fresh directory both pass
    // the first check, and only one may write its plan there.
    check_empty(dir)?;
    let parent_missing = !dir.is_dir();
    fsutil::create_private_dir_all(dir).map_err(io("cannot create", dir))?;
    check_own(dir)?;
    if parent_missing {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsutil::sync_dir(parent).map_err(io("cannot sync", parent))?;
        }
    }
    let lock = take_lock(dir)?;
    check_empty(dir)?;
    let run_id = new_run_id();
    let plan = {
        let mut env = Env::new(p, run_id.clone(), true);
        plan::build(p, &mut env)?
    };
    let plan_path = dir.join(PLAN_FILE);
    let plan_text = serde_json::to_string_pretty(&plan).expect("plans serialize");
    fsutil::write_private_new(&plan_path, plan_text.as_bytes())
        .map_err(io("cannot write", &plan_path))?;
    let mut journal = Journal::create(dir).map_err(io("cannot create the journal in", dir))?;
    let first = journal
        .append(
            None,
            Entry::RunStarted(journal::RunStarted {
                run_id: run_id.clone(),
                mode: if opts.apply { "apply" } else { "dry-run" }.into(),
                playbook: plan.playbook.clone(),
                pid: std::process::id(),
                plan_sha256: Some(plan::sha256_hex(plan_text.as_bytes())),
            }),
        )
        .map_err(io("cannot write", dir))?;
    Ok(Opened {
        plan,
        journal,
        records: vec![first],
        run_id,
        resumed: false,
        _lock: lock,
    })
}

/// The way back the run in `dir` started with, from its plan: a resumed
/// run takes it unless told otherwise. None when there is no plan to read.
pub fn started_way_back(dir: &Path) -> Option<WayBack> {
    let text = fs::read_to_string(dir.join(PLAN_FILE)).ok()?;
    let plan: Plan = serde_json::from_str(&text).ok()?;
    Some(plan.playbook.way_back)
}

fn resume(p: &Playbook, opts: &Options) -> Result<Opened, RunError> {
    let dir = &opts.run_dir;
    let shown = dir.display().to_string();
    let nothing = |why: &str| RunError::NothingToResume {
        dir: shown.clone(),
        why: why.to_owned(),
    };
    if !dir.join(journal::JOURNAL).exists() {
        return Err(nothing("no journal.jsonl"));
    }
    check_own(dir)?;
    let lock = take_lock(dir)?;
    let plan_path = dir.join(PLAN_FILE);
    let text = fs::read_to_string(&plan_path).map_err(io("cannot read", &plan_path))?;
    let plan: Plan = serde_json::from_str(&text).map_err(|e| RunError::Io {
        what: "cannot parse",
        path: plan_path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let now = plan::sha256_hex(p.text.as_bytes());
    if now != plan.playbook.sha256 {
        return Err(RunError::PlaybookChanged {
            then: plan.playbook.sha256.clone(),
            now,
        });
    }
    if p.playbook.way_back != plan.playbook.way_back {
        return Err(RunError::WayBackChanged {
            then: plan.playbook.way_back,
            now: p.playbook.way_back,
        });
    }
    let (mut journal, records) =
        Journal::resume(dir).map_err(io("cannot read the journal in", dir))?;
    let Some(Entry::RunStarted(first)) = records.first().map(|r| &r.entry) else {
        return Err(nothing("the journal does not start with run-started"));
    };
    // A resumed run walks plan.json, whose steps include SQL and hooks:
    // only the plan this run wrote.
    let Some(then) = &first.plan_sha256 else {
        return Err(RunError::PlanUnchecked { dir: shown });
    };
    let now = plan::sha256_hex(text.as_bytes());
    if &now != then {
        return Err(RunError::PlanChanged {
            path: plan_path.clone(),
            then: then.clone(),
            now,
        });
    }
    if first.mode == "dry-run" {
        return Err(RunError::DryRun { dir: shown });
    }
    if !opts.apply {
        return Err(RunError::NotDryRun { dir: shown });
    }
    let run_id = first.run_id.clone();
    let mut records = records;
    let last = records
        .iter()
        .rev()
        .find(|r| r.step.is_none())
        .map(Record::event);
    if records.last().map(Record::event) != Some(Event::RunFinished) {
        // After a pause the run goes on as planned: not a second attempt.
        let r = journal
            .append(
                None,
                Entry::Resumed(journal::Resumed {
                    pid: std::process::id(),
                    after_pause: last == Some(Event::Paused),
                }),
            )
            .map_err(io("cannot write", dir))?;
        records.push(r);
    }
    Ok(Opened {
        plan,
        journal,
        records,
        run_id,
        resumed: true,
        _lock: lock,
    })
}

/// Retries a step once or twice when its connection failed: every step is
/// idempotent, and a restarted server or a dropped connection is common in
/// the middle of an incident.
fn apply_step(
    s: &PlannedStep,
    env: &mut Env,
    journal: &mut Journal,
    state: &mut State,
    interrupted: &AtomicBool,
) -> Result<Effect, StepError> {
    let mut attempt = 0;
    loop {
        let mut rec = Recorder {
            step: &s.id,
            journal,
            state,
            interrupted,
        };
        let applied = crate::reentry::steps::guarded(|| s.action.step().apply(env, &mut rec));
        match applied {
            Err(e) if e.is_transient() && attempt < 2 => {
                attempt += 1;
                tracing::warn!(step = %s.id, attempt, error = %crate::diag::chain(&e), "a server is not answering; retrying");
                env.reset();
                std::thread::sleep(Duration::from_secs(attempt));
            }
            r => return r,
        }
    }
}

/// Runs (or dry-runs, or resumes) the playbook. `show` sees each step as it
/// finishes. A failed step ends the run with what was done so far.
pub fn run(
    p: &Playbook,
    opts: &Options,
    interrupted: &AtomicBool,
    show: &mut dyn FnMut(&StepLine),
) -> Result<RunResult, RunError> {
    let Opened {
        plan,
        mut journal,
        records,
        run_id,
        resumed,
        _lock,
    } = if opts.resume {
        resume(p, opts)?
    } else {
        start(p, opts)?
    };
    let dir = opts.run_dir.clone();
    let jw = |e| RunError::Io {
        what: "cannot write the journal in",
        path: dir.clone(),
        source: e,
    };
    let finished_before = records.last().map(Record::event) == Some(Event::RunFinished);
    let mut state = State::from_records(&records);
    let mut env = Env::new(p, run_id.clone(), !opts.apply);
    env.run_dir = Some(opts.run_dir.clone());
    let mut result = RunResult {
        run_id: run_id.clone(),
        run_dir: opts.run_dir.display().to_string(),
        mode: if opts.apply { "apply" } else { "dry-run" },
        resumed,
        status: Status::Finished,
        steps: Vec::new(),
        error: None,
        refused: false,
    };
    let mut push = |result: &mut RunResult, line: StepLine| {
        show(&line);
        result.steps.push(line);
    };
    for s in &plan.steps {
        let line = |outcome, summary: String, count, seconds| StepLine {
            id: s.id.clone(),
            title: s.title.clone(),
            outcome,
            summary,
            count,
            seconds,
        };
        if let Some(done) = state.done.get(&s.id) {
            let effect = match &done.entry {
                Entry::Done(d) => d.effect.clone(),
                _ => Effect::default(),
            };
            push(
                &mut result,
                line(Outcome::AlreadyDone, effect.summary, effect.count, None),
            );
            continue;
        }
        if let Some(until) = opts.until.filter(|u| s.phase > *u) {
            journal
                .append(
                    None,
                    Entry::Paused(journal::Paused {
                        after: until,
                        before: s.id.clone(),
                    }),
                )
                .map_err(jw)?;
            result.status = Status::Paused;
            result.error = Some(format!(
                "paused after the {} phase, before {}",
                until.label(),
                s.id
            ));
            break;
        }
        if interrupted.load(Ordering::SeqCst) {
            journal
                .append(
                    Some(&s.id),
                    Entry::Interrupted(journal::Interrupted {
                        before: Some(s.id.clone()),
                        during: None,
                    }),
                )
                .map_err(jw)?;
            result.status = Status::Interrupted;
            result.error = Some(format!("interrupted before {}", s.id));
            break;
        }
        if !opts.apply && s.nature() != Nature::Reads {
            let why = if s.nature() == Nature::Changes {
                format!("would: {}", s.preview.summary)
            } else {
                format!("runs once the gates are closed: {}", s.preview.summary)
            };
            journal
                .append(
                    Some(&s.id),
                    Entry::Skipped(journal::Skipped {
                        would: s.preview.clone(),
                        why: why.clone(),
                    }),
                )
                .map_err(jw)?;
            push(
                &mut result,
                line(Outcome::Skipped, why, s.preview.count, None),
            );
            continue;
        }
        let r = journal
            .append(
                Some(&s.id),
                Entry::Started(journal::Started {
                    title: s.title.clone(),
                    action: serde_json::to_value(&s.action).expect("actions serialize"),
                }),
            )
            .map_err(jw)?;
        state.record(&r);
        pause_point(&s.id, "started");
        let t0 = Instant::now();
        let outcome = apply_step(s, &mut env, &mut journal, &mut state, interrupted);
        let seconds = t0.elapsed().as_secs_f64();
        match outcome {
            Ok(effect) => {
                pause_point(&s.id, "applied");
                let r = journal
                    .append(
                        Some(&s.id),
                        Entry::Done(journal::Done {
                            effect: effect.clone(),
                            seconds,
                        }),
                    )
                    .map_err(jw)?;
                state.record(&r);
                push(
                    &mut result,
                    line(Outcome::Done, effect.summary, effect.count, Some(seconds)),
                );
                pause_point(&s.id, "done");
            }
            Err(StepError::Interrupted) => {
                journal
                    .append(
                        Some(&s.id),
                        Entry::Interrupted(journal::Interrupted {
                            before: None,
                            during: Some(s.id.clone()),
                        }),
                    )
                    .map_err(jw)?;
                result.status = Status::Interrupted;
                result.error = Some(format!("interrupted during {}", s.id));
                break;
            }
            Err(e) => {
                let findings = match &e {
                    StepError::Check { findings, .. } => findings.clone(),
                    _ => Vec::new(),
                };
                let message = crate::diag::chain(&e);
                journal
                    .append(
                        Some(&s.id),
                        Entry::Failed(journal::Failed {
                            error: message.clone(),
                            findings,
                            seconds,
                        }),
                    )
                    .map_err(jw)?;
                // A dry run reports every check that fails, not just the first.
                if !opts.apply && matches!(e, StepError::Check { .. }) {
                    push(
                        &mut result,
                        line(Outcome::WouldFail, message, 0, Some(seconds)),
                    );
                    continue;
                }
                push(
                    &mut result,
                    line(Outcome::Failed, message.clone(), 0, Some(seconds)),
                );
                result.status = Status::Failed;
                result.refused = matches!(e, StepError::Refused(_));
                result.error = Some(format!("{}: {message}", s.id));
                break;
            }
        }
    }
    if result.status == Status::Finished && !finished_before {
        journal
            .append(
                None,
                Entry::RunFinished(journal::RunFinished {
                    would_fail: result.would_fail(),
                }),
            )
            .map_err(jw)?;
    }
    Ok(result)
}
