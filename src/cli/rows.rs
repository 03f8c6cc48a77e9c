//! `reentry rows diff`: a playbook's repair tables compared, read-only,
//! the same diff the `rows-stage` steps run.

use std::path::PathBuf;

use crate::cli::Context;
use crate::exit::Exit;
use crate::reentry::plan::{self, PlanError};
use crate::reentry::playbook::Playbook;
use crate::reentry::steps::rows::{self, TableDiff};
use crate::reentry::steps::{Env, StepError};
use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub enum RowsCommand {
    /// Compare each [[repair]] table on the two databases, changing nothing; exit 1 when rows differ.
    Diff(DiffArgs),
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    pub playbook: PathBuf,
    /// Only this table [default: every [[repair]] table].
    #[arg(long, value_name = "TABLE")]
    pub table: Option<String>,
    /// Compare as this way back instead of the playbook's own.
    #[arg(long, value_enum, value_name = "WAY")]
    pub way_back: Option<crate::reentry::playbook::WayBack>,
}

fn step_err(table: &str, e: StepError) -> Error {
    Error::Plan(Box::new(PlanError::Step {
        step: format!("rows diff {table}"),
        source: Box::new(e),
    }))
}

pub fn run(ctx: &Context, cmd: RowsCommand) -> Result<Exit, Error> {
    let RowsCommand::Diff(a) = cmd;
    let p = match Playbook::load_as(&a.playbook, a.way_back) {
        Ok(p) => p,
        Err(d) => {
            eprintln!("{d}");
            return Ok(Exit::Config);
        }
    };
    let repairs: Vec<rows::Repair> = rows::repairs(&p)
        .into_iter()
        .filter(|r| a.table.as_ref().is_none_or(|t| t == &r.table))
        .collect();
    if repairs.is_empty() {
        let what = match &a.table {
            Some(t) => format!("has no [[repair]] for table `{t}`"),
            None => "has no [[repair]]: `rows diff` compares the tables it names".into(),
        };
        let d = crate::diag::Diagnostics::new(
            &p.file,
            &p.text,
            vec![crate::diag::Diagnostic::at(Some(0..0), what)],
        );
        eprintln!("{d}");
        return Ok(Exit::Config);
    }
    let way = p.playbook.way_back;
    let (source, target) = rows::direction(way);
    let t_ms = plan::target(&p)?.time_ms();
    let env = Env::new(&p, "diff".into(), true);
    let mut results: Vec<TableDiff> = Vec::new();
    for r in &repairs {
        let (_, td) = rows::run_diff(
            &env,
            r,
            (source, target),
            t_ms,
            way == crate::reentry::playbook::WayBack::Cutover,
            &ctx.reporter(),
        )
        .map_err(|e| step_err(&r.table, e))?;
        results.push(td);
    }
    let differ: u64 = results.iter().map(TableDiff::differences).sum();
    ctx.emit(&results, || {
        let mut lines = Vec::new();
        for r in &results {
            lines.push(r.summary());
            for (class, keys) in &r.sample {
                let shown: Vec<String> = keys.iter().map(|k| k.join(",")).collect();
                let more = r.counts.get(class).copied().unwrap_or(0) as usize - keys.len();
                lines.push(format!(
                    "  {:<8} {}{}",
                    class.as_str(),
                    shown.join(" "),
                    if more > 0 {
                        format!(" … and {more} more")
                    } else {
                        String::new()
                    }
                ));
            }
        }
        Some(lines.join("\n"))
    })?;
    Ok(if differ > 0 { Exit::Negative } else { Exit::Ok })
}
