//! `reentry restore`: a base backup (combined from its chain when it is
//! incremental) and the archive's WAL, replayed to a target in a new cluster
//! that cannot touch production: it does not archive, listens on loopback
//! only, on a port that was free, with its own socket directory. The restore
//! manifest it writes is what re-entry treats as the recovery target.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backup::archive::ArchiveError;
use crate::backup::basebackup::now_rfc3339;
use crate::backup::fence::{self, FenceError};
use crate::backup::label::BackupLabel;
use crate::backup::packed::{self, PackError};
use crate::backup::repo::{io_err, PlainBackup, Repo, RepoError};
use crate::backup::vouched::{Mismatch, Vouched, MANIFEST_FILE as BACKUP_MANIFEST, WAL_DIR};
use crate::backup::walchain::ChainIndex;
use crate::fsutil::{self, ScratchDir};
use crate::pg::conn::{Db, PgError};
use crate::pg::lsn::Lsn;
use crate::pg::tools::{self, PgBin, ToolError};
use crate::pg::wal::{SegmentName, WalFileName};
use crate::progress::Reporter;

pub const MANIFEST_FILE: &str = "reentry-restore.json";
const LOG_FILE: &str = "reentry-restore.log";

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Replay everything the archive has, then promote.
    Latest,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(SystemTime),
    Lsn(Lsn),
    Xid(u32),
    Name(String),
}

/// How a target is written in manifests and evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: Option<String>,
}

impl Target {
    pub fn spec(&self) -> TargetSpec {
        let (kind, value) = match self {
            Target::Latest => ("latest", None),
            Target::Immediate => ("immediate", None),
            Target::Time(t) => (
                "time",
                Some(humantime::format_rfc3339_millis(*t).to_string()),
            ),
            Target::Lsn(l) => ("lsn", Some(l.to_string())),
            Target::Xid(x) => ("xid", Some(x.to_string())),
            Target::Name(n) => ("name", Some(n.clone())),
        };
        TargetSpec {
            kind: kind.into(),
            value,
        }
    }

    /// Parses `--target-time` in any form PostgreSQL's
    /// `recovery_target_time` takes (see `crate::time`).
    pub fn parse_time(s: &str) -> Result<Target, RestoreError> {
        crate::time::parse(s)
            .map(|t| Target::Time(crate::time::to_system(t)))
            .map_err(|e| RestoreError::BadTarget {
                value: s.into(),
                why: e.to_string(),
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Stay in recovery, read-only, at the target: inspect before deciding.
    #[default]
    Pause,
    /// End recovery at the target and open read-write on a new timeline.
    Promote,
    /// Stop the server at the target.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error("PostgreSQL refuses to run as root: run reentry restore as the OS user that will own the restored cluster")]
    RunningAsRoot,
    #[error(
        "backup {id} has tablespaces ({}): reentry cannot restore them yet, and their links \
         point at the source's own tablespace directories, which the copy would write into",
        links.join(", ")
    )]
    Tablespaces { id: String, links: Vec<String> },
    #[error("{} is not empty: restore into a new or empty directory", dir.display())]
    NotEmpty { dir: PathBuf },
    #[error(
        "port {port} is in use on 127.0.0.1: pick a free one (or leave --port out to get one)"
    )]
    PortInUse { port: u16 },
    #[error("invalid target {value:?}: {why}")]
    BadTarget { value: String, why: String },
    #[error("no restore point {name:?} is recorded in {repo}; recorded: {known}")]
    UnknownRestorePoint {
        name: String,
        repo: String,
        known: String,
    },
    #[error(
        "refusing to choose a backup for you in {repo}: no verify key vouches for {}:{}\n\
         nothing was written; a person must look at each (it may have been planted to be \
         chosen), then remove it, or pass --backup ID to restore a backup you chose",
        if refused.len() == 1 { "this label".to_owned() } else { format!("these {} labels", refused.len()) },
        refused.iter().map(|r| format!("\n  {r}")).collect::<String>()
    )]
    Unsigned {
        repo: String,
        refused: Vec<crate::backup::repo::Refused>,
    },
    #[error("no usable backup can reach target {target}: {why}")]
    NoBackup { target: String, why: String },
    #[error("target {target} cannot be reached from backup {backup}: {why}. Nothing was copied")]
    Unreachable {
        target: String,
        backup: String,
        why: String,
    },
    #[error("recovery in {} failed: {log}", dir.display())]
    RecoveryFailed { dir: PathBuf, log: String },
    #[error("recovery in {} did not reach its target within {secs} s; the server was stopped, see {}", dir.display(), dir.join(LOG_FILE).display())]
    Timeout { dir: PathBuf, secs: u64 },
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub to: PathBuf,
    pub target: Target,
    pub backup: Option<String>,
    pub port: Option<u16>,
    /// TCP addresses the copy listens on, with the source's `pg_hba.conf`:
    /// the operator opening it (a cutover). None: fenced, a private Unix
    /// socket only.
    pub listen: Option<String>,
    pub action: Action,
    pub pg_bin: PgBin,
    pub timeout: Duration,
    /// The phases and a running count of replayed segments.
    pub progress: Reporter,
    /// From object storage: how many objects to download at once.
    pub jobs: usize,
    /// Preloaded libraries the operator lets run on the copy, besides
    /// those the fence keeps (see `fence`).
    pub allow_preload: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Durations {
    pub copy_seconds: f64,
    pub combine_seconds: f64,
    pub replay_seconds: f64,
    pub total_seconds: f64,
}

/// `reentry-restore.json` in the restored data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreManifest {
    pub format: u32,
    pub backup_id: String,
    pub backup_chain: Vec<String>,
    pub target: TargetSpec,
    pub action: Action,
    pub data_dir: String,
    pub port: u16,
    /// The directory of the copy's Unix socket: the data directory, or a
    /// private one when that path is too long for a socket.
    #[serde(default)]
    pub socket_dir: String,
    /// Where the copy listens on TCP: none when it is fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    pub repo: String,
    pub pg_version: String,
    pub system_identifier: String,
    pub timeline: u32,
    pub reached_lsn: Lsn,
    /// Commit time of the last transaction replayed.
    pub reached_time: Option<String>,
    pub wal_segments_replayed: usize,
    pub started_at: String,
    pub finished_at: String,
    pub durations: Durations,
}

fn is_empty_dir(dir: &Path) -> io::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut d) => Ok(d.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Chooses the backup, proves the target reachable, and nothing more: what
/// `restore` does before it writes anything.
pub fn plan(
    repo: &Repo,
    opts: &RestoreOptions,
) -> Result<(Vec<BackupLabel>, Target), RestoreError> {
    let archive = repo.archive();
    let sysid = archive.info()?.map(|i| i.system_identifier);
    // A name stands for the LSN recorded when it was created.
    let (target, target_lsn) = match &opts.target {
        Target::Name(n) => {
            let points = repo.restore_points()?;
            let p = points.iter().find(|p| &p.name == n).ok_or_else(|| {
                RestoreError::UnknownRestorePoint {
                    name: n.clone(),
                    repo: repo.location(),
                    known: if points.is_empty() {
                        "none".into()
                    } else {
                        points
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                }
            })?;
            (opts.target.clone(), Some(p.lsn))
        }
        Target::Lsn(l) => (opts.target.clone(), Some(*l)),
        t => (t.clone(), None),
    };
    let shown = format!(
        "{} {}",
        target.spec().kind,
        target.spec().value.unwrap_or_default()
    )
    .trim()
    .to_owned();
    let survey = repo.survey(SystemTime::now())?;
    for r in &survey.refused {
        tracing::warn!(repo = %repo.location(), label = %r.key, problem = %r.problem,
            "backup label refused: not used; a person must look");
    }
    // A label no verify key vouches for was not written by the backup
    // host, and may have been planted to be chosen: while one is there,
    // restore does not choose by itself. One asked for by id is chosen by
    // a person.
    let unsigned: Vec<_> = survey
        .refused
        .iter()
        .filter(|r| r.unsigned)
        .cloned()
        .collect();
    if opts.backup.is_none() && !unsigned.is_empty() {
        return Err(RestoreError::Unsigned {
            repo: repo.location(),
            refused: unsigned,
        });
    }
    let labels: Vec<BackupLabel> = survey
        .labels
        .into_iter()
        .filter(|b| b.is_usable() && sysid.as_ref().is_none_or(|s| *s == b.system_identifier))
        .collect();
    let fits = |b: &BackupLabel| -> Result<bool, RestoreError> {
        Ok(match (&target, target_lsn) {
            (_, Some(lsn)) => b.stop_lsn.is_some_and(|s| s <= lsn),
            (Target::Time(t), _) => b
                .stop_time
                .as_deref()
                .and_then(|s| humantime::parse_rfc3339(s).ok())
                .is_some_and(|stop| stop < *t),
            (Target::Xid(x), _) => next_xid_of(repo, &opts.pg_bin, b)? <= *x,
            _ => true,
        })
    };
    let chosen = match &opts.backup {
        Some(id) => {
            let b = repo.trusted_label(id)?;
            if !b.is_usable() {
                return Err(RestoreError::NoBackup {
                    target: shown,
                    why: format!("backup {id} is not complete"),
                });
            }
            if !fits(&b)? {
                return Err(RestoreError::Unreachable {
                    target: shown,
                    backup: id.clone(),
                    why: format!(
                        "the backup is consistent only from {}, after the target",
                        b.stop_lsn.unwrap_or_default()
                    ),
                });
            }
            b
        }
        None => {
            let mut found = None;
            for b in labels.iter().rev() {
                if fits(b)? {
                    found = Some(b.clone());
                    break;
                }
            }
            found.ok_or_else(|| RestoreError::NoBackup {
                target: shown.clone(),
                why: match labels.first() {
                    None => format!("{} has no complete backup", repo.location()),
                    Some(oldest) => format!(
                        "the oldest backup, {}, is consistent only from {} ({})",
                        oldest.id,
                        oldest.stop_lsn.unwrap_or_default(),
                        oldest.stop_time.as_deref().unwrap_or("?")
                    ),
                },
            })?
        }
    };

    let index = ChainIndex::build(&archive, &archive.list()?, false, &*opts.progress)?;
    let unreachable = |why: String| RestoreError::Unreachable {
        target: shown.clone(),
        backup: chosen.id.clone(),
        why,
    };
    let missing = index.missing_for(&chosen);
    if !missing.is_empty() {
        return Err(unreachable(format!(
            "the archive lacks {} it needs to become consistent",
            missing.join(", ")
        )));
    }
    let (tli, stop) = (
        chosen.timeline.unwrap_or(1),
        chosen.stop_lsn.unwrap_or_default(),
    );
    let reach = index.reach(tli, stop.segno(index.seg_size));
    let furthest = reach
        .iter()
        .max_by_key(|r| r.until_lsn)
        .map(|r| format!("{} on timeline {}", r.until_lsn, r.timeline))
        .unwrap_or_else(|| stop.to_string());
    if let Some(lsn) = target_lsn {
        if !reach.iter().any(|r| lsn < r.until_lsn) {
            return Err(unreachable(format!(
                "the archive's contiguous WAL ends at {furthest}"
            )));
        }
    }
    if let Target::Time(t) = target {
        // Recovery stops at a time only on seeing a commit after it.
        let last = last_commit_time(repo, &index, &reach, &opts.pg_bin)?;
        if last.is_none_or(|l| l <= t) {
            let when = last.map(|l| humantime::format_rfc3339_millis(l).to_string());
            return Err(unreachable(format!(
                "the last transaction in the archive's contiguous WAL (which ends at {furthest}) committed at {}",
                when.as_deref().unwrap_or("? (none found)")
            )));
        }
    }
    Ok((repo.chain(&chosen.id)?, target))
}

/// The commit time of the last transaction in the contiguous WAL `reach`
/// describes, read with pg_waldump from its newest segments.
pub fn last_commit_time(
    repo: &Repo,
    index: &ChainIndex,
    reach: &[crate::backup::walchain::Reach],
    pg_bin: &PgBin,
) -> Result<Option<SystemTime>, RestoreError> {
    let Some(end) = reach.iter().max_by_key(|r| r.until_lsn) else {
        return Ok(None);
    };
    let scratch = fsutil::ScratchDir::new("reentry-waldump").map_err(io_err(
        "create a scratch directory in",
        &std::env::temp_dir(),
    ))?;
    let archive = repo.archive();
    let last = end.until_lsn.segno(index.seg_size) - 1;
    // Walk back a few segments: the newest may hold no commit at all.
    for segno in (last.saturating_sub(7)..=last).rev() {
        if !index.has(end.timeline, segno) {
            break;
        }
        let name = SegmentName::from_segno(end.timeline, segno, index.seg_size).to_string();
        let path = scratch.path().join(&name);
        archive.fetch(&name, &path)?;
        // pg_waldump stops with an error at the end of the WAL; what it printed before counts.
        let out = pg_bin
            .command("pg_waldump")
            .arg("--rmgr=Transaction")
            .arg(&path)
            .env("TZ", "UTC")
            .output()
            .map_err(|source| ToolError::Spawn {
                program: pg_bin.program("pg_waldump"),
                source,
            })?;
        let _ = fs::remove_file(&path);
        let text = String::from_utf8_lossy(&out.stdout);
        let newest = text
            .lines()
            .filter_map(|l| l.split("COMMIT ").nth(1))
            .filter_map(|rest| {
                let stamp: String = rest
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                // pg_waldump runs under TZ=UTC (PgBin::command).
                crate::time::parse_utc(&stamp)
                    .ok()
                    .map(crate::time::to_system)
            })
            .max();
        if newest.is_some() {
            return Ok(newest);
        }
    }
    Ok(None)
}

/// The next transaction id recorded in a backup's control file.
/// The NextXID of backup `id`'s checkpoint: from its pg_control, which on
/// object storage is the one file downloaded.
fn next_xid_of(repo: &Repo, pg_bin: &PgBin, label: &BackupLabel) -> Result<u32, RestoreError> {
    let plain = repo.plain_backup(label)?;
    if let Some(PlainBackup {
        data,
        vouched: None,
    }) = &plain
    {
        return next_xid(pg_bin, data);
    }
    let scratch = ScratchDir::new("reentry-control").map_err(io_err(
        "create a scratch directory in",
        &std::env::temp_dir(),
    ))?;
    if let Some(PlainBackup {
        data,
        vouched: Some(v),
    }) = &plain
    {
        // Read once, checked, and read from the scratch copy alone.
        let rel = Path::new("global/pg_control");
        let bytes = fs::read(data.join(rel)).map_err(io_err("read", &data.join(rel)))?;
        v.check_whole(rel, &bytes).map_err(RepoError::from)?;
        let copy = scratch.path().join(rel);
        fs::create_dir(scratch.path().join("global"))
            .and_then(|()| fs::write(&copy, &bytes))
            .map_err(io_err("write", &copy))?;
        return next_xid(pg_bin, scratch.path());
    }
    packed::materialise(
        repo.store(),
        label,
        scratch.path(),
        Some(&["global/pg_control"]),
        repo.keys(),
        1,
        &*crate::progress::Reporter::silent(),
    )?;
    next_xid(pg_bin, scratch.path())
}

fn next_xid(pg_bin: &PgBin, data: &Path) -> Result<u32, RestoreError> {
    let out = tools::run(pg_bin.command("pg_controldata").arg(data))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint's NextXID:"))
        .and_then(|v| v.trim().rsplit(':').next()?.parse().ok())
        .ok_or_else(|| RestoreError::BadTarget {
            value: data.display().to_string(),
            why: "no NextXID in pg_controldata".into(),
        })
}

pub fn restore(repo: &Repo, opts: &RestoreOptions) -> Result<RestoreManifest, RestoreError> {
    let started = Instant::now();
    let started_at = now_rfc3339();
    if fsutil::running_as_root() {
        return Err(RestoreError::RunningAsRoot);
    }
    if !is_empty_dir(&opts.to).map_err(io_err("read", &opts.to))? {
        return Err(RestoreError::NotEmpty {
            dir: opts.to.clone(),
        });
    }
    let port = match opts.port {
        Some(p) => {
            TcpListener::bind(("127.0.0.1", p)).map_err(|_| RestoreError::PortInUse { port: p })?;
            p
        }
        None => free_port().map_err(io_err("find a free port on", Path::new("127.0.0.1")))?,
    };
    let (chain, target) = plan(repo, opts)?;
    let backup = chain.last().expect("a chain has its backup").clone();
    // Each backup's layout, as its label has it, and a signed plain one's
    // manifest: read once, and every file is checked against it as it is
    // copied out of the repository, never read from there again.
    let plains: Vec<Option<PlainBackup>> = chain
        .iter()
        .map(|b| repo.plain_backup(b))
        .collect::<Result<_, _>>()?;
    // A wrong or missing key fails before anything is written: every
    // backup of the chain, the first WAL segment it needs and the newest
    // one archived are read. Under restore_command a segment that cannot
    // be decrypted would look missing, and recovery would end early. An
    // index that would write outside the target is refused now too.
    for (b, plain) in chain.iter().zip(&plains) {
        if plain.is_none() {
            packed::manifest(repo.store(), b, repo.keys())?;
            packed::checked_index(repo.store(), b)?;
        }
    }
    // A backup of a cluster with tablespaces (taken before backups refused
    // them) links to the source's directories: restoring it would have the
    // copy write into production's files.
    for (b, plain) in chain.iter().zip(&plains) {
        let Some(PlainBackup { data, .. }) = plain else {
            continue;
        };
        let links: Vec<String> = match fs::read_dir(data.join("pg_tblspc")) {
            Ok(d) => d
                .filter_map(Result::ok)
                .map(|e| {
                    let to = fs::read_link(e.path())
                        .map_or_else(|_| "?".into(), |t| t.display().to_string());
                    format!("pg_tblspc/{} -> {to}", e.file_name().to_string_lossy())
                })
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("read", &data.join("pg_tblspc"))(e).into()),
        };
        if !links.is_empty() {
            return Err(RestoreError::Tablespaces {
                id: b.id.clone(),
                links,
            });
        }
        // Nor any other link: configuring the copy would write through it.
        fence::check_plain(&b.id, data)?;
    }
    {
        let archive = repo.archive();
        let newest = archive
            .list()?
            .files
            .into_iter()
            .filter(|f| matches!(f, WalFileName::Segment(_)))
            .max_by_key(|f| f.to_string());
        let first = chain[0]
            .required_segments()
            .first()
            .map(|s| WalFileName::Segment(*s));
        for name in first.iter().chain(newest.iter()) {
            archive.read(name, &mut io::sink())?;
        }
    }
    let repo_abs = match repo.local_root() {
        Some(root) => fs::canonicalize(root)
            .map_err(io_err("resolve", root))?
            .display()
            .to_string(),
        None => repo.location(),
    };

    // Private from the start: what lands in it is production's data,
    // decrypted.
    let created = create_target(&opts.to).map_err(io_err("create", &opts.to))?;
    let to = fs::canonicalize(&opts.to).map_err(io_err("resolve", &opts.to))?;
    // A refusal after the copy leaves the target as it found it.
    let mut unwind = Unwind {
        to: &to,
        created,
        socket: None,
        armed: true,
    };
    let mut durations = Durations::default();
    {
        let size: u64 = chain.iter().map(|b| b.size_bytes).sum();
        opts.progress.note(&format!(
            "{} backup {} ({} MiB) into {}",
            if chain.len() == 1 {
                "copying"
            } else {
                "combining"
            },
            chain
                .iter()
                .map(|b| b.id.as_str())
                .collect::<Vec<_>>()
                .join(" + "),
            size >> 20,
            to.display()
        ));
    }
    let t = Instant::now();
    let copied = |e: TreeError, into: &Path| -> RestoreError {
        match e {
            TreeError::Io(e) => io_err("copy the backup into", into)(e).into(),
            TreeError::Refused(m) => RepoError::from(m).into(),
        }
    };
    match (chain.len(), plains.last().expect("a chain has its backup")) {
        (1, Some(plain)) => {
            // check_plain refused links before anything was copied;
            // copy_tree refuses them again, in case one appeared since.
            copy_tree(&plain.data, &to, plain.vouched.as_ref()).map_err(|e| copied(e, &to))?;
            durations.copy_seconds = t.elapsed().as_secs_f64();
        }
        (1, None) => {
            packed::materialise(
                repo.store(),
                &backup,
                &to,
                None,
                repo.keys(),
                opts.jobs,
                &*opts.progress,
            )?;
            durations.copy_seconds = t.elapsed().as_secs_f64();
        }
        _ => {
            // A packed backup (on object storage, or copied from there) is
            // downloaded beside the target first, and a signed plain one
            // copied there, checked as it is copied; the chain is combined
            // from there: a private directory, like the target.
            let scratch = ScratchDir::beside(&to)
                .map_err(io_err("create a scratch directory beside", &to))?;
            let mut dirs = Vec::new();
            for (b, plain) in chain.iter().zip(&plains) {
                if let Some(PlainBackup {
                    data,
                    vouched: None,
                }) = plain
                {
                    dirs.push(data.clone());
                    continue;
                }
                let d = scratch.path().join(&b.id);
                fsutil::create_private_dir_all(&d).map_err(io_err("create", &d))?;
                match plain {
                    Some(PlainBackup { data, vouched }) => {
                        copy_tree(data, &d, vouched.as_ref()).map_err(|e| copied(e, &d))?
                    }
                    None => {
                        packed::materialise(
                            repo.store(),
                            b,
                            &d,
                            None,
                            repo.keys(),
                            opts.jobs,
                            &*opts.progress,
                        )?;
                    }
                }
                dirs.push(d);
            }
            durations.copy_seconds = t.elapsed().as_secs_f64();
            let t = Instant::now();
            // pg_combinebackup insists on creating the output directory
            // itself, with the modes of the backups': it writes in the
            // scratch directory, and the result, made private, replaces
            // the empty target.
            let out = scratch.path().join("combined");
            let mut cmd = opts.pg_bin.command("pg_combinebackup");
            cmd.arg("-o").arg(&out);
            cmd.args(&dirs);
            tools::run(&mut cmd)?;
            private_tree(&out).map_err(io_err("set permissions in", &out))?;
            fs::rename(&out, &to).map_err(io_err("move the combined backup to", &to))?;
            durations.combine_seconds = t.elapsed().as_secs_f64();
        }
    }
    crate::reentry::steps::pause_point("restore", "copied");
    let socket = socket_dir(&to, port).map_err(io_err("make the socket directory for", &to))?;
    if socket != to {
        unwind.socket = Some(socket.clone());
    }
    let major = fs::read_to_string(to.join("PG_VERSION"))
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .ok_or_else(|| RestoreError::RecoveryFailed {
            dir: to.clone(),
            log: "the backup has no readable PG_VERSION".into(),
        })?;
    if opts.listen.is_some() && !is_plain_file(&to.join("pg_hba.conf")) {
        return Err(FenceError::NoSourceHba.into());
    }
    configure(
        &to,
        &Listen {
            port,
            socket: &socket,
            tcp: opts.listen.as_deref(),
        },
        &repo_abs,
        repo.keys().identity_file(),
        &target,
        opts.action,
        major,
    )
    .map_err(io_err("configure", &to))?;
    let checked = fence::check_config(&opts.pg_bin, &to, major, &opts.allow_preload)?;

    let t = Instant::now();
    // From here every error stops the server: one left running would hold
    // the copy's files and port, and a drill would delete its directory
    // under it.
    let server = Postmaster::guard(&opts.pg_bin, &to);
    let reached = match replay(&to, port, &socket, opts, &checked) {
        Ok(r) => {
            unwind.armed = false;
            r
        }
        // The started copy failed the fence's checks (replay stopped it).
        Err(e @ RestoreError::Fence(_)) => return Err(e),
        Err(e) => {
            // Past the fence's checks, a failed recovery keeps its files to
            // look at; its server is stopped, and a socket directory of its
            // own goes with it.
            unwind.armed = false;
            drop(server);
            if !to.join("postmaster.pid").exists() {
                if let Some(s) = &unwind.socket {
                    let _ = fs::remove_dir_all(s);
                }
            }
            return Err(e);
        }
    };
    durations.replay_seconds = t.elapsed().as_secs_f64();
    durations.total_seconds = started.elapsed().as_secs_f64();
    let manifest = RestoreManifest {
        format: 1,
        backup_id: backup.id.clone(),
        backup_chain: chain.iter().map(|b| b.id.clone()).collect(),
        target: target.spec(),
        action: opts.action,
        data_dir: to.display().to_string(),
        port,
        socket_dir: socket.display().to_string(),
        listen: opts.listen.clone(),
        repo: repo_abs.clone(),
        pg_version: reached.pg_version,
        system_identifier: reached.system_identifier,
        timeline: reached.timeline,
        reached_lsn: reached.lsn,
        reached_time: reached.time,
        wal_segments_replayed: reached.segments,
        started_at,
        finished_at: now_rfc3339(),
        durations,
    };
    let mut text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    text.push('\n');
    fsutil::write_atomic(&to.join(MANIFEST_FILE), text.as_bytes())
        .map_err(io_err("write", &to.join(MANIFEST_FILE)))?;
    server.keep();
    Ok(manifest)
}

/// Creates the restore target 0700 whatever the umask (its parents as
/// usual), or makes the empty one that is there 0700, before anything is
/// written in it. Whether it was created.
fn create_target(to: &Path) -> io::Result<bool> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let created = match fs::symlink_metadata(to) {
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsutil::create_dir_all_durable(parent)?;
            }
            fs::DirBuilder::new().mode(0o700).create(to)?;
            if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsutil::sync_dir(parent)?;
            }
            true
        }
        Err(e) => return Err(e),
    };
    fs::set_permissions(to, fs::Permissions::from_mode(0o700))?;
    Ok(created)
}

/// A postmaster started on `dir`: stopped with `pg_ctl stop -m immediate`
/// when dropped, unless [`Postmaster::keep`] hands it over. A restore that
/// fails after the start, and a drill however it ends, leave no server
/// behind. Stopping a server that is not running is harmless.
pub struct Postmaster<'a> {
    pg_bin: &'a PgBin,
    dir: &'a Path,
    armed: bool,
}

impl<'a> Postmaster<'a> {
    pub fn guard(pg_bin: &'a PgBin, dir: &'a Path) -> Postmaster<'a> {
        Postmaster {
            pg_bin,
            dir,
            armed: true,
        }
    }

    /// The server stays up: the restore succeeded.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Postmaster<'_> {
    fn drop(&mut self) {
        if !self.armed || !self.dir.join("postmaster.pid").exists() {
            return;
        }
        // -w: the directory may be deleted next; the server must be gone.
        let out = self
            .pg_bin
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self.dir)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                tracing::info!(dir = %self.dir.display(), "stopped the server this restore started")
            }
            Ok(o) => tracing::warn!(
                dir = %self.dir.display(),
                "could not stop the server this restore started: {}; stop it with pg_ctl stop -D {}",
                String::from_utf8_lossy(&o.stderr).trim(),
                self.dir.display()
            ),
            Err(e) => tracing::warn!(
                dir = %self.dir.display(),
                "could not run pg_ctl to stop the server this restore started: {e}; stop it with pg_ctl stop -D {}",
                self.dir.display()
            ),
        }
    }
}

/// Undoes a restore refused before its copy started: the target is left
/// as it was found (removed if the restore created it, else emptied), and
/// a socket directory of its own is removed.
struct Unwind<'a> {
    to: &'a Path,
    created: bool,
    socket: Option<PathBuf>,
    armed: bool,
}

impl Drop for Unwind<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(s) = &self.socket {
            let _ = fs::remove_dir_all(s);
        }
        if self.created {
            let _ = fs::remove_dir_all(self.to);
        } else if let Ok(entries) = fs::read_dir(self.to) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = match e.file_type() {
                    Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
                    _ => fs::remove_file(&p),
                };
            }
        }
    }
}

/// A regular file, not a link to one.
fn is_plain_file(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file())
}

/// Takes group and other permissions off everything below `dir` (and
/// `dir`): the copy is its owner's alone, whatever the source allowed.
fn private_tree(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o700;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    if meta.is_dir() {
        for entry in fs::read_dir(dir)? {
            private_tree(&entry?.path())?;
        }
    }
    Ok(())
}

/// Why `copy_tree` stopped: an I/O error, or a file its vouched manifest
/// refuses.
enum TreeError {
    Io(io::Error),
    Refused(Mismatch),
}

impl From<io::Error> for TreeError {
    fn from(e: io::Error) -> TreeError {
        TreeError::Io(e)
    }
}

impl From<Mismatch> for TreeError {
    fn from(m: Mismatch) -> TreeError {
        TreeError::Refused(m)
    }
}

/// Copies a plain backup directory, two files at a time (the machine's
/// two cores keep two requests in flight). Every directory and file is
/// created with its owner's permissions only, and nothing but
/// directories and regular files is copied: a link would be followed by
/// the writes that configure the copy.
///
/// With `vouched` (a signed backup's manifest, see vouched.rs) each file
/// is hashed as it is copied, and refused unless its size and SHA-256 are
/// what the manifest lists; a file it does not list is refused before
/// anything is copied, one it lists that is missing after. No file of
/// `pg_wal/` is copied (recovery fetches WAL from the archive), and the
/// manifest written is the one the label vouched for. What was copied
/// stays for the caller to remove.
fn copy_tree(from: &Path, to: &Path, vouched: Option<&Vouched>) -> Result<(), TreeError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let mut files = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut dirs = vec![(from.to_owned(), to.to_owned())];
    while let Some((src, dst)) = dirs.pop() {
        if dst != to {
            let mode = fs::symlink_metadata(&src)?.permissions().mode() & 0o700;
            fs::DirBuilder::new().mode(mode).create(&dst)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
        }
        for entry in fs::read_dir(&src)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let target = dst.join(entry.file_name());
            if kind.is_dir() {
                dirs.push((entry.path(), target));
            } else if kind.is_file() {
                let meta = entry.metadata()?;
                let path = entry.path();
                let rel = path
                    .strip_prefix(from)
                    .expect("below the backup")
                    .to_owned();
                if let Some(v) = vouched {
                    if Vouched::left_out(&rel) || rel == Path::new(BACKUP_MANIFEST) {
                        continue;
                    }
                    v.size(&rel, meta.len())?;
                    seen.insert(rel.clone());
                }
                files.push((
                    meta.len(),
                    meta.permissions().mode() & 0o700,
                    path,
                    target,
                    rel,
                ));
            } else {
                return Err(io::Error::other(format!(
                    "{} is not a directory or a regular file: a restore copies no link",
                    entry.path().display()
                ))
                .into());
            }
        }
    }
    if let Some(v) = vouched {
        v.all_present(&seen)?;
    }
    let create = |mode: u32, dst: &Path| -> io::Result<fs::File> {
        let w = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dst)?;
        w.set_permissions(fs::Permissions::from_mode(mode))?;
        Ok(w)
    };
    let copy = |mode: u32, src: &Path, dst: &Path, rel: &Path| -> Result<(), TreeError> {
        let mut r = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)?;
        let mut w = create(mode, dst)?;
        let Some(v) = vouched else {
            io::copy(&mut r, &mut w)?;
            return Ok(());
        };
        // What is written is what was hashed: one read.
        let mut reading = v.reading(rel);
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            reading.update(&buf[..n]);
            w.write_all(&buf[..n])?;
        }
        reading.finish()?;
        Ok(())
    };
    // Largest first, so the two workers finish together.
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> Result<(), TreeError> {
                    // The first refusal stops the other worker too.
                    while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((_, mode, src, dst, rel)) = files.get(i) else {
                            return Ok(());
                        };
                        if let Err(e) = copy(*mode, src, dst, rel) {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("copy worker panicked"))
    })?;
    if let Some(v) = vouched {
        create(0o600, &to.join(BACKUP_MANIFEST))?.write_all(v.bytes())?;
        // The server needs pg_wal/ and its archive_status/ (and makes the
        // rest), whatever the repository held there.
        for d in [to.join(WAL_DIR), to.join(WAL_DIR).join("archive_status")] {
            match fs::DirBuilder::new().mode(0o700).create(&d) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e.into()),
                _ => {}
            }
        }
    }
    // One sync for the whole tree rather than one per file.
    fsutil::sync_dir(to)?;
    Ok(())
}

/// Where a restored copy can be reached.
struct Listen<'a> {
    port: u16,
    /// A directory only the server's OS user can enter.
    socket: &'a Path,
    /// TCP addresses, where the operator opened the copy.
    tcp: Option<&'a str>,
}

/// The copy's socket directory: its data directory (0700), or where that
/// path is too long for a Unix socket (about 100 bytes), a new private
/// directory of this restore's own in the temporary directory (never one
/// that was there: whoever made it could reach the socket). A refused or
/// failed restore removes it, and a drill once its copy is stopped; a copy
/// left running (or shut down, to be started again) keeps it.
fn socket_dir(to: &Path, port: u16) -> io::Result<PathBuf> {
    if to.as_os_str().len() < 90 {
        return Ok(to.to_owned());
    }
    use std::os::unix::fs::DirBuilderExt;
    let dir =
        std::env::temp_dir().join(format!("{SOCKET_DIR_PREFIX}{port}-{}", std::process::id()));
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// The name of a socket directory `socket_dir` made in the temporary
/// directory starts with this.
pub const SOCKET_DIR_PREFIX: &str = "reentry-socket-";

/// The client authentication of a fenced copy: its socket only, in a
/// directory no other OS user can enter, so no other user of the host and
/// nothing over the network reaches production's data through the
/// source's `pg_hba.conf` (often `trust` on 127.0.0.1).
const FENCED_HBA: &str = "# Written by reentry restore: a fenced copy accepts connections only on
# its Unix socket, in a directory only the server's OS user can enter.
# The source's own rules are in pg_hba.conf.source; `reentry restore
# --listen` opens a copy with them.
local all all trust
";

/// `s` as one word of `restore_command`: quoted for the shell (a `'`
/// closes the quote, is escaped, and reopens it), with every `%` doubled
/// so that PostgreSQL substitutes none of a path's `%f`, `%p` or `%r`.
fn command_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''").replace('%', "%%"))
}

/// The recovery settings and the fence (see `fence`), last in
/// postgresql.auto.conf so they win over anything the backup carried
/// (ALTER SYSTEM writes there too), and the copy's own pg_hba.conf. No
/// write goes through a link: the files are created new, or opened with
/// O_NOFOLLOW.
#[allow(clippy::too_many_arguments)]
fn configure(
    to: &Path,
    listen: &Listen,
    repo: &str,
    identity: Option<&Path>,
    target: &Target,
    action: Action,
    major: u32,
) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let exe = std::env::current_exe()?;
    // A string in postgresql.auto.conf: its parser reads backslash
    // escapes and doubled quotes.
    let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"));
    let create = |p: &Path| {
        // What the backup had there (never a link's target) goes first.
        match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(p)?,
            Ok(_) => fs::remove_file(p)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fsutil::private_options()
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
    };
    let hba = to.join("pg_hba.conf");
    let kept = to.join("pg_hba.conf.source");
    match fs::symlink_metadata(&hba) {
        Ok(m) if m.file_type().is_file() => fs::rename(&hba, &kept)?,
        Ok(_) => {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                hba.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let rules = match listen.tcp {
        Some(_) if is_plain_file(&kept) => fs::read(&kept)?,
        _ => FENCED_HBA.as_bytes().to_vec(),
    };
    create(&hba)?.write_all(&rules)?;
    let mut lines = vec![
        "# Written by reentry restore: a fenced copy.".to_owned(),
        format!("port = {}", listen.port),
        format!("listen_addresses = {}", quote(listen.tcp.unwrap_or(""))),
        format!(
            "unix_socket_directories = {}",
            quote(&listen.socket.display().to_string())
        ),
        // The server's own file, wherever the source kept its rules.
        format!("hba_file = {}", quote(&hba.display().to_string())),
        "archive_mode = off".to_owned(),
        "archive_command = ''".to_owned(),
        "archive_library = ''".to_owned(),
        "primary_conninfo = ''".to_owned(),
        "primary_slot_name = ''".to_owned(),
        "synchronous_standby_names = ''".to_owned(),
        // The source's shell commands run nowhere else: a cleanup command
        // carried from a standby's settings deletes production's WAL where
        // the archive is mounted.
        "recovery_end_command = ''".to_owned(),
        "archive_cleanup_command = ''".to_owned(),
        // Subscriptions would start applying from production's publishers
        // on promotion, and take the real subscriber's slots: no worker can
        // start until the operator raises these.
        "max_logical_replication_workers = 0".to_owned(),
        "max_sync_workers_per_subscription = 0".to_owned(),
        // pg_cron, where the source loads it, launches no job (a setting
        // PostgreSQL keeps as a placeholder where pg_cron is absent).
        "cron.launch_active_jobs = off".to_owned(),
        "hot_standby = on".to_owned(),
        // reentry reads the server log ("restored log file", FATAL, ...):
        // untranslated, whatever the primary's lc_messages was.
        "lc_messages = 'C'".to_owned(),
        format!(
            "restore_command = {}",
            quote(&format!(
                "{} --repo {}{} wal fetch %f %p",
                command_word(&exe.display().to_string()),
                command_word(repo),
                match identity {
                    Some(p) => format!(
                        " --identity {}",
                        command_word(&fs::canonicalize(p)?.display().to_string())
                    ),
                    None => String::new(),
                }
            ))
        ),
        "recovery_target_timeline = 'latest'".to_owned(),
    ];
    match target {
        Target::Latest => {}
        Target::Immediate => lines.push("recovery_target = 'immediate'".into()),
        Target::Time(t) => lines.push(format!(
            "recovery_target_time = {}",
            quote(&pg_timestamp(*t))
        )),
        Target::Lsn(l) => lines.push(format!("recovery_target_lsn = '{l}'")),
        Target::Xid(x) => lines.push(format!("recovery_target_xid = '{x}'")),
        Target::Name(n) => lines.push(format!("recovery_target_name = {}", quote(n))),
    }
    if *target != Target::Latest {
        let a = match action {
            Action::Pause => "pause",
            Action::Promote => "promote",
            Action::Shutdown => "shutdown",
        };
        lines.push(format!("recovery_target_action = '{a}'"));
    }
    // Where a setting would run the source's code, or start its jobs.
    lines.extend(fence::settings(major));
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to.join("postgresql.auto.conf"))?;
    writeln!(f, "\n{}", lines.join("\n"))?;
    f.sync_all()?;
    create(&to.join("recovery.signal"))?.sync_all()?;
    fs::remove_file(to.join("standby.signal")).or_else(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })
}

/// `2026-11-25 13:23:44.123456+00`: recovery_target_time does not take the
/// ISO 8601 `T`/`Z` form.
fn pg_timestamp(t: SystemTime) -> String {
    crate::time::postgres(crate::time::from_system(t))
}

struct Reached {
    lsn: Lsn,
    time: Option<String>,
    timeline: u32,
    segments: usize,
    system_identifier: String,
    pg_version: String,
}

/// Starts the server and waits until recovery reached its target (paused,
/// promoted or shut down as asked) or failed.
fn replay(
    to: &Path,
    port: u16,
    socket: &Path,
    opts: &RestoreOptions,
    checked: &fence::Checked,
) -> Result<Reached, RestoreError> {
    let log = to.join(LOG_FILE);
    opts.progress.stage("replaying WAL", None);
    let status = opts
        .pg_bin
        .command("pg_ctl")
        .args(["start", "-W", "-D"])
        .arg(to)
        .arg("-l")
        .arg(&log)
        .stdout(Stdio::null())
        .status()
        .map_err(|source| ToolError::Spawn {
            program: opts.pg_bin.program("pg_ctl"),
            source,
        })?;
    if !status.success() {
        return Err(RestoreError::RecoveryFailed {
            dir: to.to_owned(),
            log: log_tail(&log),
        });
    }
    let stop = || {
        let _ = opts
            .pg_bin
            .command("pg_ctl")
            .args(["stop", "-m", "fast", "-D"])
            .arg(to)
            .output();
    };
    let conninfo = format!(
        "host={} port={port} dbname=postgres connect_timeout=2 {}",
        crate::pg::conn::quote_value(&socket.display().to_string()),
        fence::SESSION_OPTIONS
    );
    // The fence's checks of a started copy, on its first answer: pg_cron's
    // launcher starts only once recovery has ended.
    let mut fence_checked = false;
    let deadline = Instant::now() + opts.timeout;
    let wants_open = opts.target == Target::Latest || opts.action == Action::Promote;
    let launched = Instant::now();
    let mut last_report = launched;
    let mut seen_running = false;
    loop {
        if Instant::now() > deadline {
            stop();
            return Err(RestoreError::Timeout {
                dir: to.to_owned(),
                secs: opts.timeout.as_secs(),
            });
        }
        // pg_ctl -W returns before the postmaster writes its pid file.
        let running = to.join("postmaster.pid").exists();
        seen_running |= running;
        let text = if running {
            String::new()
        } else {
            fs::read_to_string(&log).unwrap_or_default()
        };
        let exited = text.contains("database system is shut down") || text.contains("FATAL");
        if !running && (seen_running || exited || launched.elapsed() > Duration::from_secs(10)) {
            if opts.action == Action::Shutdown && text.contains("recovery stopping") {
                return reached_from_control(&opts.pg_bin, to, &text);
            }
            return Err(RestoreError::RecoveryFailed {
                dir: to.to_owned(),
                log: log_tail(&log),
            });
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            let (n, _) = count_restored(&fs::read_to_string(&log).unwrap_or_default());
            opts.progress.advance(
                n as u64,
                &format!(
                    "{n} segments restored, {:.0} s",
                    launched.elapsed().as_secs_f64()
                ),
            );
            last_report = Instant::now();
        }
        let conn = Db::connect(Some(&conninfo));
        if let Err(e) = &conn {
            // fence::SESSION_OPTIONS are a superuser's to set.
            if e.to_string().contains("permission denied to set parameter") {
                stop();
                return Err(FenceError::Pg(conn.err().expect("an error")).into());
            }
        }
        if let Ok(mut db) = conn {
            if !fence_checked {
                match fence::check_running(&mut db, checked) {
                    Ok(()) => fence_checked = true,
                    // Asked again on the next connection.
                    Err(FenceError::Pg(_)) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    Err(e) => {
                        drop(db);
                        stop();
                        return Err(e.into());
                    }
                }
            }
            let row = db.query_one(
                "read the recovery state",
                "SELECT pg_is_in_recovery(),
                        CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE '' END",
                &[],
            );
            if let Ok(row) = row {
                let (in_recovery, pause): (bool, String) = (row.get(0), row.get(1));
                let done = if wants_open {
                    !in_recovery
                } else {
                    in_recovery && pause == "paused"
                };
                if done {
                    opts.progress.finish();
                    return reached_from_server(&mut db, to);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count_restored(log: &str) -> (usize, Option<u32>) {
    let mut n = 0;
    let mut last_tli = None;
    for line in log.lines() {
        if let Some(rest) = line.split("restored log file \"").nth(1) {
            let name = rest.split('"').next().unwrap_or("");
            if let Ok(WalFileName::Segment(s)) = WalFileName::parse(name) {
                n += 1;
                last_tli = Some(s.timeline);
            }
        }
    }
    (n, last_tli)
}

/// The time of the restore point recovery stopped at, from the server's
/// log (`recovery stopping at restore point "x", time 2026-…+00`; servers
/// run with lc_messages = 'C').
fn restore_point_time(log: &str) -> Option<SystemTime> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("recovery stopping at restore point"))?;
    let stamp = line.rsplit(", time ").next()?.trim();
    crate::time::parse(stamp).ok().map(crate::time::to_system)
}

fn reached_from_server(db: &mut Db, to: &Path) -> Result<Reached, RestoreError> {
    let row = db.query_one(
        "read where recovery stopped",
        "SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp(),
                (SELECT system_identifier::text FROM pg_control_system()), current_setting('server_version'),
                CASE WHEN pg_is_in_recovery() THEN 0
                     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END",
        &[],
    )?;
    let text = fs::read_to_string(to.join(LOG_FILE)).unwrap_or_default();
    let (segments, last_tli) = count_restored(&text);
    let open_tli = row.get::<_, i32>(4) as u32;
    let lsn: Option<String> = row.get(0);
    let time: Option<SystemTime> = row.get(1);
    // Stopped at a named restore point: its own time is T (the last
    // transaction replayed may be long before it, or absent).
    let time = restore_point_time(&text).or(time);
    Ok(Reached {
        lsn: lsn.and_then(|l| l.parse().ok()).unwrap_or_default(),
        time: time.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        timeline: if open_tli > 0 {
            open_tli
        } else {
            last_tli.unwrap_or(1)
        },
        segments,
        system_identifier: row.get(2),
        pg_version: row.get(3),
    })
}

/// After `--action shutdown` there is no server to ask: the control file
/// says where recovery ended.
fn reached_from_control(pg_bin: &PgBin, to: &Path, log: &str) -> Result<Reached, RestoreError> {
    let (segments, last_tli) = count_restored(log);
    let out = tools::run(pg_bin.command("pg_controldata").arg(to))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let lsn = field("Minimum recovery ending location:")
        .parse::<Lsn>()
        .unwrap_or_default();
    let lsn = if lsn == Lsn(0) {
        field("Latest checkpoint location:")
            .parse()
            .unwrap_or_default()
    } else {
        lsn
    };
    Ok(Reached {
        lsn,
        time: None,
        timeline: field("Min recovery ending loc's timeline:")
            .parse()
            .ok()
            .filter(|t| *t > 0)
            .or(last_tli)
            .unwrap_or(1),
        segments,
        system_identifier: field("Database system identifier:"),
        pg_version: fs::read_to_string(to.join("PG_VERSION"))
            .unwrap_or_default()
            .trim()
            .to_owned(),
    })
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let important: Vec<&str> = text
        .lines()
        .filter(|l| {
            ["FATAL", "ERROR", "PANIC", "invalid", "DETAIL", "HINT"]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect();
    let lines = if important.is_empty() {
        text.lines().collect::<Vec<_>>()
    } else {
        important
    };
    let tail = lines[lines.len().saturating_sub(4)..].join(" / ");
    format!("{tail} (full log: {})", log.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_command_word_survives_quotes_and_percent_signs() {
        assert_eq!(command_word("/r/a"), "'/r/a'");
        assert_eq!(command_word("/r/it's %f"), "'/r/it'\\''s %%f'");
    }

    #[test]
    fn the_time_of_the_restore_point_recovery_stopped_at_is_read_from_the_log() {
        let log = "2026-11-28 21:40:13.001 UTC [9] LOG:  restored log file \"000000010000000000000003\" from archive
2026-11-28 21:40:13.002 UTC [9] LOG:  recovery stopping at restore point \"before_incident\", time 2026-11-28 21:40:12.123456+01
2026-11-28 21:40:13.003 UTC [9] LOG:  pausing at the end of recovery";
        let t = restore_point_time(log).unwrap();
        assert_eq!(
            humantime::format_rfc3339_millis(t).to_string(),
            "2026-11-28T20:40:12.123Z"
        );
        assert_eq!(restore_point_time("LOG:  recovery stopping before commit of transaction 7, time 2026-11-28 21:40:12+00"), None);
    }
}
