//! `reentry cache invalidate`: the cache steps' invalidation by hand,
//! without a playbook: keys from templates and a file of ids, or keys
//! matching patterns on every primary. The same code the `cache-keys`
//! and `cache-patterns` steps run, without their journal.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::cache::Redis;
use crate::cli::Context;
use crate::exit::Exit;
use crate::reentry::steps::caches::{self, ScanState};
use crate::reentry::steps::StepError;
use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub enum CacheCommand {
    /// Unlink keys from Redis: templates filled with ids, or patterns scanned on every primary.
    Invalidate(InvalidateArgs),
}

#[derive(Debug, clap::Args)]
pub struct InvalidateArgs {
    /// redis:// or rediss:// URL (a password in it is never shown).
    #[arg(
        long,
        env = "REENTRY_REDIS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub url: String,
    /// A Redis Cluster: every primary, keys routed by hash slot.
    #[arg(long)]
    pub cluster: bool,
    /// With rediss://: the CA that signs the server's certificate (PEM), else the system's.
    #[arg(
        long,
        env = "REENTRY_REDIS_TLS_CA",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// With rediss://: a client certificate (PEM), for servers that require one.
    #[arg(
        long,
        env = "REENTRY_REDIS_TLS_CERTIFICATE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub tls_certificate: Option<PathBuf>,
    /// With rediss://: the client certificate's key (PEM).
    #[arg(
        long,
        env = "REENTRY_REDIS_TLS_KEY",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub tls_key: Option<PathBuf>,
    /// Unlink the keys matching PATTERN (SCAN MATCH); repeatable.
    #[arg(long, value_name = "PATTERN", conflicts_with_all = ["template", "ids"])]
    pub pattern: Vec<String>,
    /// A key template such as `case:{id}`; repeatable; needs --ids.
    #[arg(long, value_name = "TEMPLATE", requires = "ids")]
    pub template: Vec<String>,
    /// A file of ids, one per line (`-` for stdin), to fill the templates with.
    #[arg(long, value_name = "FILE", requires = "template")]
    pub ids: Option<PathBuf>,
    /// The largest COUNT a SCAN asks for.
    #[arg(long, default_value_t = 1000)]
    pub scan_count: usize,
    /// Keys per UNLINK pipeline.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Unlink the keys. Without it: count what would go (EXISTS, or a
    /// read-only SCAN) and change nothing.
    #[arg(long)]
    pub apply: bool,
    /// The default; kept so that older scripts still parse.
    #[arg(long, conflicts_with = "apply", hide = true)]
    pub dry_run: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Outcome {
    redis: String,
    strategy: &'static str,
    dry_run: bool,
    /// Keys found (dry run) or unlinked.
    keys: u64,
    /// Templates filled: keys looked at.
    candidates: Option<u64>,
    per_node: Vec<(String, u64)>,
    seconds: f64,
    keys_per_second: f64,
}

fn step_err(e: impl Into<StepError>) -> Error {
    Error::Step {
        what: "cache invalidate",
        source: Box::new(e.into()),
    }
}

fn read_ids(path: &PathBuf) -> Result<Vec<Vec<String>>, Error> {
    let io = |e: std::io::Error| {
        step_err(StepError::Input {
            message: format!("cannot read {}: {e}", path.display()),
        })
    };
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).map_err(io)?,
        ))
    };
    let mut ids = Vec::new();
    for l in reader.lines() {
        let l = l.map_err(io)?;
        let l = l.trim();
        if !l.is_empty() {
            ids.push(vec![l.to_owned()]);
        }
    }
    Ok(ids)
}

pub fn run(ctx: &Context, cmd: CacheCommand) -> Result<Exit, Error> {
    let CacheCommand::Invalidate(a) = cmd;
    let dry_run = !a.apply;
    if a.pattern.is_empty() && a.template.is_empty() {
        eprintln!("give --pattern, or --template with --ids");
        return Ok(Exit::Usage);
    }
    // The keys are made before connecting: the server sees only the work.
    let keys = match &a.ids {
        Some(path) => Some(
            caches::fill(&a.template, &["id".to_owned()], &read_ids(path)?).map_err(step_err)?,
        ),
        None => None,
    };
    let tls = crate::tls_files::TlsFiles {
        ca: a.tls_ca.clone(),
        certificate: a.tls_certificate.clone(),
        key: a.tls_key.clone(),
    };
    let mut r = Redis::connect(&a.url, &a.url, a.cluster, &tls).map_err(step_err)?;
    let nodes = r.primaries();
    tracing::info!(redis = %r.shown(), primaries = nodes.len(), "connected");
    let progress = ctx.reporter();
    let started = Instant::now();
    let mut out = Outcome {
        redis: r.shown().to_owned(),
        strategy: if a.pattern.is_empty() {
            "keys"
        } else {
            "patterns"
        },
        dry_run,
        keys: 0,
        candidates: None,
        per_node: nodes.iter().map(|n| (n.clone(), 0)).collect(),
        seconds: 0.0,
        keys_per_second: 0.0,
    };
    if let Some(keys) = keys {
        out.candidates = Some(keys.len() as u64);
        progress.stage("unlinking keys", Some(keys.len() as u64));
        for (n, chunk) in keys.chunks(a.batch_size.max(1)).enumerate() {
            out.keys += if dry_run {
                r.exists(chunk)
            } else {
                r.unlink(chunk)
            }
            .map_err(step_err)?;
            progress.advance(((n + 1) * a.batch_size).min(keys.len()) as u64, "");
        }
        progress.finish();
    } else {
        for (ni, node) in nodes.iter().enumerate() {
            for p in &a.pattern {
                progress.stage(&format!("{p} on {node}"), None);
                let found = if dry_run {
                    caches::scan_count(&mut r, ni, p, a.scan_count).map_err(step_err)?
                } else {
                    let mut save = |s: &ScanState| -> Result<(), StepError> {
                        progress.advance(s.unlinked, "unlinked");
                        Ok(())
                    };
                    caches::scan_unlink(
                        &mut r,
                        ni,
                        p,
                        a.scan_count,
                        ScanState::default(),
                        &mut save,
                    )
                    .map_err(step_err)?
                    .unlinked
                };
                progress.finish();
                out.per_node[ni].1 += found;
                out.keys += found;
            }
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.keys_per_second = out.keys as f64 / out.seconds.max(1e-9);
    ctx.emit(&out, || {
        Some(format!(
            "{} {} key(s) in {} on {} primar{} in {:.2} s ({:.0} keys/s)",
            if dry_run { "would unlink" } else { "unlinked" },
            out.keys,
            out.redis,
            nodes.len(),
            if nodes.len() == 1 { "y" } else { "ies" },
            out.seconds,
            out.keys_per_second
        ))
    })?;
    if dry_run && out.keys > 0 {
        eprintln!("reentry: a dry run: nothing was unlinked; pass --apply to unlink these keys");
        return Ok(Exit::Negative);
    }
    Ok(Exit::Ok)
}
