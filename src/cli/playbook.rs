use std::path::PathBuf;

use serde::Serialize;

use crate::cli::Context;
use crate::diag::Diagnostics;
use crate::exit::Exit;
use crate::reentry::check;
use crate::reentry::playbook::Playbook;
use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub enum PlaybookCommand {
    /// Check a playbook: parse, meaning, then every table and column on its databases.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    pub playbook: PathBuf,
    /// Stop before connecting to the databases.
    #[arg(long)]
    pub offline: bool,
    /// Check it as this way back instead of its own `[playbook] way-back`.
    #[arg(long, value_enum, value_name = "WAY")]
    pub way_back: Option<crate::reentry::playbook::WayBack>,
}

#[derive(Serialize)]
pub(super) struct Located {
    line: Option<usize>,
    column: Option<usize>,
    message: String,
}

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    playbook: &'a str,
    stages: Vec<&'static str>,
    errors: Vec<Located>,
    /// Offline: what only connecting needs (unset `${VAR}`s).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notes: Vec<Located>,
}

pub(super) fn located(d: &Diagnostics) -> Vec<Located> {
    d.items
        .iter()
        .map(|i| {
            let lc = i.span.as_ref().map(|s| d.line_col(s.start));
            Located {
                line: lc.map(|x| x.0),
                column: lc.map(|x| x.1),
                message: i.message.clone(),
            }
        })
        .collect()
}

pub fn run(ctx: &Context, cmd: PlaybookCommand) -> Result<Exit, Error> {
    let PlaybookCommand::Check(a) = cmd;
    let shown = a.playbook.display().to_string();
    let mut stages = vec!["parse", "meaning"];
    let mut notes = None;
    let diagnostics = match Playbook::load_offline_as(&a.playbook, a.way_back) {
        Err(d) => Some(d),
        Ok((_, unset)) if a.offline => {
            notes = Some(unset).filter(|u| !u.items.is_empty());
            None
        }
        Ok((_, unset)) if !unset.items.is_empty() => Some(unset),
        Ok((p, _)) => {
            stages.push("databases");
            let errors = check::check_online(&p);
            (!errors.is_empty()).then(|| Diagnostics::new(&p.file, &p.text, errors))
        }
    };
    match diagnostics {
        None => {
            let report = Report {
                ok: true,
                playbook: &shown,
                stages: stages.clone(),
                errors: vec![],
                notes: notes.as_ref().map(located).unwrap_or_default(),
            };
            ctx.emit(&report, || {
                let mut s = format!("ok: {shown} ({})", stages.join(", "));
                if let Some(n) = &notes {
                    s.push_str(&format!(
                        "\n{}\n(set them where the plan runs: plan, apply and the online check connect with them)",
                        n.notes()
                    ));
                }
                Some(s)
            })?;
            Ok(Exit::Ok)
        }
        Some(d) => {
            if ctx.global.json {
                let report = Report {
                    ok: false,
                    playbook: &shown,
                    stages,
                    errors: located(&d),
                    notes: vec![],
                };
                ctx.emit(&report, || None)?;
            } else {
                eprintln!("{d}");
            }
            Ok(Exit::Config)
        }
    }
}
