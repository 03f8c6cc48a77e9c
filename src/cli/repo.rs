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
    /// A new key pair to sign backup labels with: the private key to FILE
    /// (for the backup host), the public key on stdout (for every host
    /// that restores, expires, verifies or copies).
    Keygen(KeygenArgs),
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the private key (PKCS#8 PEM, mode 0600); it must not
    /// exist.
    #[arg(long, value_name = "FILE")]
    pub out: std::path::PathBuf,
}

/// What `repo keygen` made: never the private key itself.
#[derive(Debug, serde::Serialize)]
struct Generated {
    private_key_file: String,
    public_key: String,
    key_id: String,
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
        RepoCommand::Keygen(a) => keygen(ctx, a),
    }
}

fn keygen(ctx: &Context, a: KeygenArgs) -> Result<Exit, Error> {
    let public = crate::sign::keygen(&a.out)
        .map_err(|e| Error::Config(crate::config::ConfigError::Keys(e.to_string())))?;
    let g = Generated {
        private_key_file: a.out.display().to_string(),
        public_key: public.to_string(),
        key_id: public.key_id().to_string(),
    };
    ctx.emit(&g, || {
        Some(format!(
            "{}\n# private key written to {} (key id {}): set signing.key-file to it on the \
             backup host only; set signing.verify-keys to the line above everywhere",
            g.public_key, g.private_key_file, g.key_id
        ))
    })?;
    Ok(Exit::Ok)
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
