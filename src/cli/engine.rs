//! `reentry plan`, `reentry apply` and `reentry report`: the re-entry engine
//! on the command line.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::cli::playbook::located;
use crate::cli::{print_line, Context};
use crate::diag::Diagnostics;
use crate::exit::Exit;
use crate::reentry::plan::{self, Plan, PlanError};
use crate::reentry::playbook::{Playbook, WayBack};
use crate::reentry::report;
use crate::reentry::run::{self, Outcome, RunError, Status, StepLine};
use crate::reentry::steps::{Env, Phase};
use crate::Error;

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    pub playbook: PathBuf,
    /// Take this way back instead of the playbook's `[playbook] way-back`:
    /// its `[[repair]]` tables that name a way back, and the databases
    /// named `survivor` and `retired`, follow.
    #[arg(long, value_enum, value_name = "WAY")]
    pub way_back: Option<WayBack>,
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    pub playbook: PathBuf,
    /// Take this way back instead of the playbook's `[playbook] way-back`:
    /// its `[[repair]]` tables that name a way back, and the databases
    /// named `survivor` and `retired`, follow. A resumed run takes the way back it started with.
    #[arg(long, value_enum, value_name = "WAY")]
    pub way_back: Option<WayBack>,
    /// Where the plan, the journal and the evidence go; one run per directory.
    #[arg(long, value_name = "DIR")]
    pub run_dir: PathBuf,
    /// Make the changes. Without it: a dry run (read-only sessions, nothing changed).
    #[arg(long)]
    pub apply: bool,
    /// Continue the run in --run-dir where it stopped.
    #[arg(long)]
    pub resume: bool,
    /// Stop (exit 0) once PHASE is done, e.g. `settle` to hold the gates
    /// closed and look around; `--resume` goes on from there.
    #[arg(long, value_enum, value_name = "PHASE")]
    pub until: Option<Phase>,
    /// Let the playbook's shell commands (`rebuild-hook`) run, as you. Without it,
    /// `--apply` on a playbook that has one refuses, naming each, before anything changes.
    #[arg(long)]
    pub allow_hooks: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Md,
    Json,
    Html,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    pub run_dir: PathBuf,
    #[arg(long, value_enum, default_value = "md")]
    pub format: Format,
    /// Write to FILE instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Serialize)]
struct HooksRefused<'a> {
    ok: bool,
    playbook: &'a str,
    error: String,
    hooks: Vec<Hook>,
}

#[derive(Serialize)]
struct Hook {
    at: String,
    command: String,
}

/// An `--apply` without `--allow-hooks` of a playbook with shell commands:
/// each named, then exit 64, nothing done.
fn hooks_refused(
    ctx: &Context,
    playbook: &std::path::Path,
    hooks: Vec<(String, String)>,
) -> Result<Exit, Error> {
    let shown = playbook.display().to_string();
    let error = format!(
        "{shown}: runs {} shell command(s) as you; read them, then add --allow-hooks",
        hooks.len()
    );
    if ctx.global.json {
        ctx.emit(
            &HooksRefused {
                ok: false,
                playbook: &shown,
                error,
                hooks: hooks
                    .into_iter()
                    .map(|(at, command)| Hook { at, command })
                    .collect(),
            },
            || None,
        )?;
    } else {
        eprintln!("{error}");
        for (at, command) in hooks {
            eprintln!("  {at}: {command}");
        }
    }
    Ok(Exit::Usage)
}

#[derive(Serialize)]
struct Invalid<'a> {
    ok: bool,
    playbook: &'a str,
    errors: Vec<crate::cli::playbook::Located>,
}

/// A playbook with errors: every one, located, then exit 78.
fn invalid(ctx: &Context, d: &Diagnostics) -> Result<Exit, Error> {
    if ctx.global.json {
        let shown = d.path.display().to_string();
        ctx.emit(
            &Invalid {
                ok: false,
                playbook: &shown,
                errors: located(d),
            },
            || None,
        )?;
    } else {
        eprintln!("{d}");
    }
    Ok(Exit::Config)
}

fn render_plan(p: &Plan) -> String {
    let mut o = format!(
        "plan for {} ({}): {} steps, {} change something\nrecovery target: {}\n",
        p.playbook.name,
        p.playbook.way_back,
        p.steps.len(),
        p.changes(),
        p.target.describe()
    );
    let width = p
        .steps
        .iter()
        .map(|s| s.id.len())
        .max()
        .unwrap_or(0)
        .min(32);
    let mut phase = None;
    for (i, s) in p.steps.iter().enumerate() {
        if phase != Some(s.phase) {
            o.push_str(&format!("\n{}\n", s.phase.label()));
            phase = Some(s.phase);
        }
        let mut line = format!("  {:>2}  {:<width$}  {}", i + 1, s.id, s.preview.summary);
        if !s.preview.items.is_empty() {
            let shown: Vec<&str> = s.preview.items.iter().take(4).map(String::as_str).collect();
            line.push_str(&format!(" [{}", shown.join(", ")));
            if s.preview.items.len() > 4 {
                line.push_str(&format!(", +{}", s.preview.items.len() - 4));
            }
            line.push(']');
        }
        o.push_str(&line);
        o.push('\n');
    }
    if !p.notes.is_empty() {
        o.push_str("\nnotes\n");
        for n in &p.notes {
            o.push_str(&format!("  - {n}\n"));
        }
    }
    o.trim_end().to_owned()
}

/// Plans without a run: read-only sessions, nothing written anywhere.
/// Exit 1 when the plan changes something, 0 when there is nothing to do.
pub fn plan(ctx: &Context, a: PlanArgs) -> Result<Exit, Error> {
    let p = match Playbook::load_as(&a.playbook, a.way_back) {
        Ok(p) => p,
        Err(d) => return invalid(ctx, &d),
    };
    let mut env = Env::new(&p, "plan".into(), true);
    let plan = match plan::build(&p, &mut env) {
        Ok(plan) => plan,
        Err(PlanError::Playbook(d)) => return invalid(ctx, &d),
        Err(e) => return Err(e.into()),
    };
    ctx.emit(&plan, || Some(render_plan(&plan)))?;
    Ok(if plan.changes() > 0 {
        Exit::Negative
    } else {
        Exit::Ok
    })
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl-C (or SIGTERM) stops the run between steps; a second one stops it
/// at once, which the journal makes as safe as a crash.
fn stop_between_steps() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let ctrl_c = tokio::spawn(async {
                while tokio::signal::ctrl_c().await.is_ok() {
                    on_signal();
                }
            });
            let term = tokio::spawn(async {
                use tokio::signal::unix::{signal, SignalKind};
                if let Ok(mut s) = signal(SignalKind::terminate()) {
                    while s.recv().await.is_some() {
                        on_signal();
                    }
                }
            });
            let _ = ctrl_c.await;
            let _ = term.await;
        });
    });
}

fn on_signal() {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // A hook in its own process group hears no Ctrl-C from the
        // terminal: it must not outlive reentry.
        crate::reentry::steps::hook::kill_running();
        eprintln!("reentry: stopping now; continue later with --resume");
        std::process::exit(Exit::Failure as i32);
    }
    eprintln!("reentry: stopping after the current step (again to stop now)");
}

fn step_line(l: &StepLine) -> String {
    let mark = match l.outcome {
        Outcome::Done => "done",
        Outcome::AlreadyDone => "was done",
        Outcome::Skipped => "skip",
        Outcome::Failed => "FAILED",
        Outcome::WouldFail => "WOULD FAIL",
    };
    let took = l.seconds.map_or(String::new(), |s| format!(" ({s:.2}s)"));
    format!("  {mark:<10} {}  {}{took}", l.id, l.summary)
}

pub fn apply(ctx: &Context, a: ApplyArgs) -> Result<Exit, Error> {
    let way = match (a.way_back, a.resume) {
        (None, true) => run::started_way_back(&a.run_dir),
        (w, _) => w,
    };
    let p = match Playbook::load_as(&a.playbook, way) {
        Ok(p) => p,
        Err(d) => return invalid(ctx, &d),
    };
    let hooks = crate::reentry::steps::search::hooks(&p);
    if a.apply && !a.allow_hooks && !hooks.is_empty() {
        return hooks_refused(ctx, &a.playbook, hooks);
    }
    stop_between_steps();
    let opts = run::Options {
        run_dir: a.run_dir.clone(),
        apply: a.apply,
        resume: a.resume,
        until: a.until,
    };
    let human = !ctx.global.json;
    if human {
        eprintln!(
            "{} {}, {}, in {}",
            match (a.apply, a.resume) {
                (true, true) => "resuming",
                (true, false) => "applying",
                (false, _) => "dry run of",
            },
            p.playbook.name,
            p.playbook.way_back,
            a.run_dir.display()
        );
    }
    // A resumed run's steps done before: one line for them all, not one each.
    let mut done_before = 0usize;
    let mut show = |l: &StepLine| {
        if !human {
            return;
        }
        if l.outcome == Outcome::AlreadyDone {
            done_before += 1;
            return;
        }
        if done_before > 0 {
            let _ = print_line(&format!(
                "  {:<10} {done_before} step(s) done before this attempt",
                "was done"
            ));
            done_before = 0;
        }
        let _ = print_line(&step_line(l));
    };
    let result = match run::run(&p, &opts, &INTERRUPTED, &mut show) {
        Ok(r) => r,
        Err(RunError::Plan(PlanError::Playbook(d))) => return invalid(ctx, &d),
        Err(e) => return Err(e.into()),
    };
    let resume_hint = format!(
        "reentry apply {} --run-dir {} --apply --resume",
        a.playbook.display(),
        a.run_dir.display()
    );
    ctx.emit(&result, || {
        Some(match result.status {
            Status::Finished if result.mode == "dry-run" => format!(
                "dry run finished: {} steps, {} check(s) would fail; nothing was changed. Apply: reentry apply {} --run-dir NEW_DIR --apply",
                result.steps.len(),
                result.would_fail(),
                a.playbook.display()
            ),
            Status::Finished => format!(
                "finished: {} steps ({} done before this attempt); report: reentry report {}",
                result.steps.len(),
                result.steps.iter().filter(|s| s.outcome == Outcome::AlreadyDone).count(),
                a.run_dir.display()
            ),
            Status::Paused if result.mode == "dry-run" => format!(
                "dry run {}, as asked (--until); nothing was changed",
                result.error.as_deref().unwrap_or("paused")
            ),
            Status::Paused => format!(
                "{}, as asked (--until); continue: {resume_hint}",
                result.error.as_deref().unwrap_or("paused")
            ),
            Status::Failed => format!(
                "stopped: {}\nfix the cause, then continue: {resume_hint}",
                result.error.as_deref().unwrap_or("a step failed")
            ),
            Status::Interrupted => format!(
                "stopped: {}; continue: {resume_hint}",
                result.error.as_deref().unwrap_or("interrupted")
            ),
        })
    })?;
    Ok(match result.status {
        Status::Finished if result.would_fail() > 0 => Exit::Negative,
        Status::Finished | Status::Paused => Exit::Ok,
        Status::Failed if result.refused => Exit::Refused,
        Status::Failed | Status::Interrupted => Exit::Failure,
    })
}

pub fn report(ctx: &Context, a: ReportArgs) -> Result<Exit, Error> {
    let r = report::build(&a.run_dir)?;
    let format = if ctx.global.json {
        Format::Json
    } else {
        a.format
    };
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&r).expect("reports serialize"),
        Format::Md => report::markdown(&r),
        Format::Html => report::html(&r),
    };
    match &a.output {
        Some(path) => {
            crate::fsutil::write_atomic_private(path, text.as_bytes()).map_err(Error::Output)?;
            if !ctx.global.quiet {
                eprintln!("wrote {}", path.display());
            }
        }
        None => print_line(text.trim_end())?,
    }
    Ok(Exit::Ok)
}
