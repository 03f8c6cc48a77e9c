use crate::backup::copy;
use crate::cli::backup::ObjectOpts;
use crate::cli::{human_bytes, Context};
use crate::exit::Exit;
use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub enum RepoCommand {
    /// Copy what another repository lacks: WAL, backups, restore points and
    /// drills, checked before they leave and after they arrive; run again
    /// to resume or catch up.
    Copy(CopyArgs),
}

#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// The second repository: s3://bucket/prefix or a directory.
    #[arg(long, value_name = "LOCATION")]
    pub to: String,
    /// Show what is missing there, and copy nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub objects: ObjectOpts,
}

pub fn run(ctx: &Context, cmd: RepoCommand) -> Result<Exit, Error> {
    match cmd {
        RepoCommand::Copy(a) => copy_cmd(ctx, a),
    }
}

fn copy_cmd(ctx: &Context, a: CopyArgs) -> Result<Exit, Error> {
    let from = ctx.open_repo()?;
    let to = ctx.open_repo_at(&a.to)?;
    let r = copy::copy(
        &from,
        &to,
        a.objects.jobs(),
        ctx.config.checksum,
        a.dry_run,
        &*ctx.reporter(),
    )?;
    ctx.emit(&r, || {
        let mut out = if r.dry_run {
            format!(
                "{} lacks {} object(s), {}, of {}",
                r.to,
                r.missing,
                human_bytes(r.missing_bytes as f64),
                r.from
            )
        } else {
            format!(
                "copied {} object(s), {}, from {} to {}{}; {} already there",
                r.copied,
                human_bytes(r.bytes as f64),
                r.from,
                r.to,
                match r.packed.len() {
                    0 => String::new(),
                    _ => format!(" (packed: {})", r.packed.join(", ")),
                },
                r.present
            )
        };
        for p in &r.problems {
            out.push_str(&format!("\n  {p}"));
        }
        Some(out)
    })?;
    Ok(if r.problems.is_empty() {
        Exit::Ok
    } else {
        Exit::Negative
    })
}
