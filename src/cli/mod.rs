//! Command-line interface: argument types and the dispatch to the library.
//! Each subcommand module owns its `Args` and its `run`.

mod backup;
mod cache;
mod engine;
mod kafka;
mod playbook;
mod repo;
mod restore;
mod rows;
mod status;
mod wal;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::exit::Exit;
use crate::Error;

#[derive(Debug, Parser)]
#[command(
    name = "reentry",
    version,
    about = "PostgreSQL backup, point-in-time recovery and application re-entry"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, clap::Args)]
pub struct GlobalOpts {
    /// Repository directory (else REENTRY_REPO, else `repo` in the config file).
    #[arg(
        long,
        global = true,
        env = "REENTRY_REPO",
        hide_env_values = true,
        value_name = "DIR"
    )]
    pub repo: Option<PathBuf>,
    /// Config file [default: ./reentry.toml if present].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Encrypt what is stored to this age public key (age1…); repeat for
    /// several [default: encryption.recipients in the config].
    #[arg(
        long,
        global = true,
        env = "REENTRY_AGE_RECIPIENTS",
        hide_env_values = true,
        value_name = "RECIPIENT",
        value_delimiter = ','
    )]
    pub encrypt_to: Vec<String>,
    /// An age identity file (AGE-SECRET-KEY-1… lines) to decrypt what is
    /// read [default: encryption.identity-file in the config].
    #[arg(
        long,
        global = true,
        env = "REENTRY_AGE_IDENTITY_FILE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub identity: Option<PathBuf>,
    /// The private key (PKCS#8 PEM) backup labels are signed with
    /// [default: signing.key-file in the config].
    #[arg(
        long,
        global = true,
        env = "REENTRY_SIGNING_KEY_FILE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub signing_key: Option<PathBuf>,
    /// A public key (ed25519:…) backup labels must be signed by; repeat for
    /// several [default: signing.verify-keys in the config].
    #[arg(
        long,
        global = true,
        env = "REENTRY_VERIFY_KEYS",
        hide_env_values = true,
        value_name = "KEY",
        value_delimiter = ','
    )]
    pub verify_key: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The WAL archive: PostgreSQL's archive_command and restore_command.
    #[command(subcommand)]
    Wal(wal::WalCommand),
    /// Take a base backup (`backup list|verify|expire` manage them).
    Backup(backup::BackupArgs),
    /// Create a named restore point and record it in the repository.
    RestorePoint(status::RestorePointArgs),
    /// Archiver, WAL, slots, sizes, backups: the health of backup and recovery.
    Status(status::StatusArgs),
    /// Force a WAL switch and confirm the segment reaches the archive.
    Check(status::CheckArgs),
    /// Point-in-time restore into a new, fenced cluster.
    Restore(restore::RestoreArgs),
    /// Restore, validate, measure RTO/RPO, write evidence, tear down.
    Drill(restore::DrillArgs),
    /// The gate before a risky migration: healthy archive, verified backup, then a restore point.
    Preflight(restore::PreflightArgs),
    /// Re-entry playbooks.
    #[command(subcommand)]
    Playbook(playbook::PlaybookCommand),
    /// What re-entry would do: ordered steps with counts, changing nothing.
    Plan(engine::PlanArgs),
    /// Walk the plan, journaled: a dry run unless --apply; --resume continues a run that died.
    Apply(engine::ApplyArgs),
    /// Evidence from a run directory: timeline, changes, gates, validation.
    Report(engine::ReportArgs),
    /// Kafka by hand: offsets at a time, a group's state, a group rewind.
    #[command(subcommand)]
    Kafka(kafka::KafkaCommand),
    /// An outbox against its topic, by hand.
    #[command(subcommand)]
    Outbox(kafka::OutboxCommand),
    /// Rows by hand: a playbook's repair tables compared across the two databases.
    #[command(subcommand)]
    Rows(rows::RowsCommand),
    /// Redis by hand: keys unlinked by template and ids, or by pattern on every primary.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// The repository itself: a second copy.
    #[command(subcommand)]
    Repo(repo::RepoCommand),
}

/// Which server to talk to: a conninfo string or URL, else libpq's PGHOST,
/// PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectOpts {
    /// Connection string or URL [default: the PG* environment variables].
    #[arg(long, value_name = "CONNINFO")]
    pub db: Option<String>,
}

/// Where PostgreSQL's own programs are.
#[derive(Debug, Clone, clap::Args)]
pub struct PgBinOpts {
    /// PostgreSQL's bin directory, matching the server's major version [default: PATH].
    #[arg(
        long,
        env = "REENTRY_PG_BIN",
        hide_env_values = true,
        value_name = "DIR"
    )]
    pub pg_bin: Option<PathBuf>,
}

impl PgBinOpts {
    pub fn pg_bin(&self) -> crate::pg::tools::PgBin {
        crate::pg::tools::PgBin::new(self.pg_bin.clone())
    }
}

/// `1.5 GiB`.
pub fn human_bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", units[i])
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// `3m`, `2h`, `4d`.
pub fn human_age(seconds: f64) -> String {
    let s = seconds.max(0.0);
    match s {
        s if s < 120.0 => format!("{s:.0}s"),
        s if s < 7200.0 => format!("{:.0}m", s / 60.0),
        s if s < 172_800.0 => format!("{:.0}h", s / 3600.0),
        s => format!("{:.0}d", s / 86_400.0),
    }
}

/// What a command needs from the environment it runs in.
pub struct Context {
    pub global: GlobalOpts,
    pub config: Config,
}

impl Context {
    pub fn repo(&self) -> Result<PathBuf, Error> {
        self.global
            .repo
            .clone()
            .or_else(|| self.config.repo.clone())
            .ok_or(Error::Config(ConfigError::NoRepo))
    }

    /// The repository of `--repo` or the config: a local directory or
    /// `s3://bucket/prefix`, with the keys of `keys`.
    pub fn open_repo(&self) -> Result<crate::backup::repo::Repo, Error> {
        let repo = self.repo()?;
        let location = crate::storage::Location::parse(&repo.to_string_lossy())
            .map_err(|e| Error::Config(ConfigError::BadRepo(e.to_string())))?;
        let keys = self.keys()?;
        Ok(crate::backup::repo::Repo::open(&location)
            .map_err(|e| Error::Repo(crate::backup::repo::RepoError::Store(e)))?
            .with_keys(keys))
    }

    /// Another repository, at `location`, with the same keys.
    pub fn open_repo_at(&self, location: &str) -> Result<crate::backup::repo::Repo, Error> {
        let location = crate::storage::Location::parse(location)
            .map_err(|e| Error::Config(ConfigError::BadRepo(e.to_string())))?;
        Ok(crate::backup::repo::Repo::open(&location)
            .map_err(|e| Error::Repo(crate::backup::repo::RepoError::Store(e)))?
            .with_keys(self.keys()?))
    }

    /// The age recipients and identities of the flags, else the config.
    /// A recipient or identity that does not parse is an error here,
    /// before anything is read or written.
    pub fn keys(&self) -> Result<crate::crypt::Keys, Error> {
        use crate::crypt::{Identities, Keys, Recipients};
        let bad = |e: crate::crypt::CryptError| Error::Config(ConfigError::Keys(e.to_string()));
        let (recipients, what) = if self.global.encrypt_to.is_empty() {
            (
                self.config.encryption.recipients.clone(),
                "encryption.recipients",
            )
        } else {
            (self.global.encrypt_to.clone(), "--encrypt-to")
        };
        let to = match recipients.is_empty() {
            true => None,
            false => Some(Recipients::parse(&recipients, what).map_err(bad)?),
        };
        let identity = self
            .global
            .identity
            .clone()
            .or_else(|| self.config.encryption.identity_file.clone());
        let identities = match identity {
            Some(path) => Some(std::sync::Arc::new(
                Identities::from_file(&path).map_err(bad)?,
            )),
            None => None,
        };
        Ok(Keys {
            to,
            identities,
            trust: self.trust()?,
        })
    }

    /// The signing key and verify keys of the flags, else the config;
    /// one that does not parse is an error here, before anything.
    fn trust(&self) -> Result<crate::sign::Trust, Error> {
        use crate::sign::{SigningKey, Trust, VerifyKey};
        let bad = |e: crate::sign::SignError| Error::Config(ConfigError::Keys(e.to_string()));
        let (keys, what) = if self.global.verify_key.is_empty() {
            (&self.config.signing.verify_keys, "signing.verify-keys")
        } else {
            (&self.global.verify_key, "--verify-key")
        };
        let verify = keys
            .iter()
            .filter(|k| !k.trim().is_empty())
            .map(|k| VerifyKey::parse(k, what))
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        let signer = match self
            .global
            .signing_key
            .clone()
            .or_else(|| self.config.signing.key_file.clone())
        {
            Some(path) => Some(std::sync::Arc::new(
                SigningKey::from_file(&path).map_err(bad)?,
            )),
            None => None,
        };
        Ok(Trust { signer, verify })
    }

    /// Whether to show progress: a person is watching stderr.
    pub fn progress(&self) -> bool {
        !self.global.json && !self.global.quiet && io::stderr().is_terminal()
    }

    /// Where the library reports progress: a bar on a terminal, nothing
    /// when stderr is not one, with `-q`, or with `--json`.
    pub fn reporter(&self) -> crate::progress::Reporter {
        if self.progress() {
            crate::progress::Reporter::new(Bar::new())
        } else {
            crate::progress::Reporter::silent()
        }
    }

    /// Prints a result as JSON when `--json` was given, else the human text.
    pub fn emit<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> Option<String>,
    ) -> Result<(), Error> {
        let text = if self.global.json {
            Some(serde_json::to_string(value).expect("reports serialize"))
        } else {
            human()
        };
        match text {
            Some(t) => print_line(&t),
            None => Ok(()),
        }
    }
}

/// Writes one line to stdout. A closed pipe (`reentry … | head`) is not an
/// error.
pub fn print_line(line: &str) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Error::Output),
    }
}

pub fn init_logging(opts: &GlobalOpts) {
    use tracing::Level;
    let level = match (opts.quiet, opts.verbose) {
        (true, _) => Level::ERROR,
        (false, 0) => Level::WARN,
        (false, 1) => Level::INFO,
        _ => Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_max_level(level)
        .with_target(false)
        .without_time()
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
}

pub fn run(cli: Cli) -> Result<Exit, Error> {
    let config = Config::load(cli.global.config.as_deref())?;
    let ctx = Context {
        global: cli.global,
        config,
    };
    match cli.command {
        Command::Wal(cmd) => wal::run(&ctx, cmd),
        Command::Backup(args) => backup::run(&ctx, args),
        Command::RestorePoint(args) => status::restore_point(&ctx, args),
        Command::Status(args) => status::status(&ctx, args),
        Command::Check(args) => status::check(&ctx, args),
        Command::Restore(args) => restore::restore(&ctx, args),
        Command::Drill(args) => restore::drill(&ctx, args),
        Command::Preflight(args) => restore::preflight(&ctx, args),
        Command::Playbook(cmd) => playbook::run(&ctx, cmd),
        Command::Plan(args) => engine::plan(&ctx, args),
        Command::Apply(args) => engine::apply(&ctx, args),
        Command::Report(args) => engine::report(&ctx, args),
        Command::Kafka(cmd) => kafka::kafka(&ctx, cmd),
        Command::Outbox(cmd) => kafka::outbox(&ctx, cmd),
        Command::Rows(cmd) => rows::run(&ctx, cmd),
        Command::Cache(cmd) => cache::run(&ctx, cmd),
        Command::Repo(cmd) => repo::run(&ctx, cmd),
    }
}

/// Progress drawn on stderr with indicatif.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Bar {
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        Bar(bar)
    }
}

impl crate::progress::Progress for Bar {
    fn stage(&self, what: &str, total: Option<u64>) {
        let style = match total {
            Some(n) => {
                self.0.set_length(n);
                indicatif::ProgressStyle::with_template(
                    "{prefix}: {bar:30} {pos}/{len} {msg} ({elapsed})",
                )
            }
            None => {
                indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})")
            }
        };
        if let Ok(style) = style {
            self.0.set_style(style);
        }
        self.0.set_prefix(what.to_owned());
        self.0.set_position(0);
        self.0
            .enable_steady_tick(std::time::Duration::from_millis(250));
    }

    fn advance(&self, done: u64, status: &str) {
        self.0.set_position(done);
        self.0.set_message(status.to_owned());
    }

    fn note(&self, line: &str) {
        self.0.println(line);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap prints `[env: NAME=value]` in `--help` unless told not to, and
    /// these variables carry passwords (a Redis URL) or say where keys are.
    #[test]
    fn every_environment_backed_option_hides_its_value_in_help() {
        fn walk(cmd: &clap::Command, path: &str, bad: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_env().is_some() && !arg.is_hide_env_values_set() {
                    bad.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), bad);
            }
        }
        let mut bad = Vec::new();
        walk(&Cli::command(), "reentry", &mut bad);
        assert!(bad.is_empty(), "env options that show their value: {bad:?}");
    }
}
