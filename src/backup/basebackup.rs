//! `reentry backup`: a base backup with pg_basebackup into the repository,
//! full or incremental (PostgreSQL 17+), labelled, and complete only once the
//! WAL that makes it consistent is in the archive.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use crate::backup::archive::ArchiveError;
use crate::backup::label::{BackupLabel, BackupStatus, BackupType, WalRange, LABEL_FORMAT};
use crate::backup::packed::{self, PackError};
use crate::backup::repo::{Repo, RepoError};
use crate::backup::stored::{Algorithm, Compression, Form};
use crate::fsutil::{self, ScratchDir};
use crate::pg::conn::{Db, PgError};
use crate::pg::lsn::Lsn;
use crate::pg::tools::{self, PgBin, ToolError};
use crate::pg::wal::WalFileName;
use crate::progress::Reporter;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("PostgreSQL {version} cannot take incremental backups (they need 17 or later); take a full backup")]
    IncrementalUnsupported { version: u32 },
    #[error(
        "incremental backups need WAL summaries, and summarize_wal is off on {target}: \
         set summarize_wal = on, reload, and take a full backup to be the parent"
    )]
    SummarizeWalOff { target: String },
    #[error("no complete backup of system {system} in {repo} to be the parent of an incremental backup; take a full backup first")]
    NoParent { system: String, repo: String },
    #[error("backup {parent} cannot be the parent: {why}")]
    BadParent { parent: String, why: String },
    #[error(
        "archive_mode is off on {target}: a backup without archived WAL cannot be restored. \
         Set archive_mode = on and archive_command = 'reentry --repo {repo} wal push %p', then restart"
    )]
    ArchiveOff { target: String, repo: String },
    #[error(
        "{target} has tablespaces outside its data directory ({}): reentry cannot back them up yet. \
         pg_basebackup would write them to their production paths, object storage would not get \
         them, and a restore would link back to production's files. Back up this cluster with \
         another tool until reentry supports tablespaces",
        tablespaces.join(", ")
    )]
    Tablespaces {
        target: String,
        tablespaces: Vec<String>,
    },
    #[error(
        "the archive in {repo} holds WAL of system {archive}, but {target} is system {server}: \
         back it up into the repository its archive_command writes to"
    )]
    WrongCluster {
        repo: String,
        target: String,
        archive: String,
        server: String,
    },
    #[error(
        "backup {id} failed: WAL segment {segment} did not reach the archive within {secs} s. \
         Run `reentry check` to test archive_command"
    )]
    WalTimeout {
        id: String,
        segment: String,
        secs: u64,
    },
    #[error(
        "restore point {name:?} was created, but segment {segment} that holds it did not reach the archive \
         within {secs} s, so it cannot be restored yet. Run `reentry check` to test archive_command"
    )]
    RestorePointNotArchived {
        name: String,
        segment: String,
        secs: u64,
    },
    #[error("restore point name {name:?} is {why}")]
    BadRestorePointName { name: String, why: &'static str },
    #[error(
        "restore point {name:?} is already recorded (LSN {lsn}, {time}); recovery stops at the first \
         point of a name, so choose another"
    )]
    DuplicateRestorePoint {
        name: String,
        lsn: String,
        time: String,
    },
    #[error(
        "{repo}: labels here must be signed (backups are encrypted, or verify keys are set), \
         and no signing key is set: run `reentry repo keygen --out FILE` once, then set \
         signing.key-file in the config (or --signing-key, or REENTRY_SIGNING_KEY_FILE); \
         nothing was written"
    )]
    NeedSigningKey { repo: String },
    #[error("backup {id}: cannot read {} written by pg_basebackup: {detail}", path.display())]
    BadBackupFiles {
        id: String,
        path: PathBuf,
        detail: String,
    },
}

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub conninfo: Option<String>,
    pub incremental: bool,
    pub parent: Option<String>,
    pub cluster_name: Option<String>,
    pub pg_bin: PgBin,
    pub archive_timeout: Duration,
    /// Show pg_basebackup's progress on stderr (a terminal).
    pub progress: bool,
    /// On object storage: how many objects to compress and upload at once.
    pub jobs: usize,
    /// On object storage: the zstd level of the objects.
    pub level: i32,
    /// On object storage: the objects' checksum.
    pub checksum: Algorithm,
    /// The upload's progress.
    pub reporter: Reporter,
    /// Where a packed backup is written in plain first: a private
    /// directory in it, removed after [default: the temporary directory].
    pub scratch: Option<PathBuf>,
}

struct Server {
    major: u32,
    cluster_name: String,
    system_identifier: String,
    archive_mode: String,
    seg_size: u32,
    summarize_wal: Option<String>,
    /// `name (location)` of each tablespace besides pg_default and pg_global.
    tablespaces: Vec<String>,
}

fn server_facts(db: &mut Db) -> Result<Server, PgError> {
    let row = db.query_one(
        "read the server's settings",
        "SELECT current_setting('server_version_num')::int / 10000,
                current_setting('cluster_name'),
                (SELECT system_identifier::text FROM pg_control_system()),
                current_setting('archive_mode'),
                (SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size'),
                current_setting('summarize_wal', true)",
        &[],
    )?;
    let tablespaces = db
        .query(
            "list the tablespaces",
            "SELECT format('%s (%s)', spcname, pg_tablespace_location(oid))
               FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY spcname",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Server {
        tablespaces,
        major: row.get::<_, i32>(0) as u32,
        cluster_name: row.get(1),
        system_identifier: row.get(2),
        archive_mode: row.get(3),
        seg_size: row.get::<_, i32>(4) as u32,
        summarize_wal: row.get(5),
    })
}

/// Now, in UTC to the millisecond: labels sort by it.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `20261125-125301F`: sortable, and says full or incremental at a glance.
fn new_id(repo: &Repo, kind: BackupType) -> Result<String, RepoError> {
    loop {
        let t = now_rfc3339();
        let digits: String = t.chars().filter(char::is_ascii_digit).collect();
        let id = format!(
            "{}-{}{}",
            &digits[..8],
            &digits[8..14],
            if kind == BackupType::Full { 'F' } else { 'I' }
        );
        if !repo.has_backup(&id)? {
            return Ok(id);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn take(repo: &Repo, opts: &BackupOptions) -> Result<BackupLabel, BackupError> {
    // An unsigned label among encrypted objects could not be told from a
    // planted one, and where verify keys are set it would be refused:
    // refused before anything, the server included.
    let keys = repo.keys();
    if keys.trust.signer.is_none() && (keys.to.is_some() || !keys.trust.verify.is_empty()) {
        return Err(BackupError::NeedSigningKey {
            repo: repo.location(),
        });
    }
    let mut db = Db::connect(opts.conninfo.as_deref())?;
    let target = db.target().to_owned();
    let server = server_facts(&mut db)?;
    if !server.tablespaces.is_empty() {
        return Err(BackupError::Tablespaces {
            target,
            tablespaces: server.tablespaces,
        });
    }
    if server.archive_mode == "off" {
        return Err(BackupError::ArchiveOff {
            target,
            repo: repo.location(),
        });
    }
    if let Some(info) = repo.archive().info()? {
        if info.system_identifier != server.system_identifier {
            return Err(BackupError::WrongCluster {
                repo: repo.location(),
                target,
                archive: info.system_identifier,
                server: server.system_identifier,
            });
        }
    }
    let kind = if opts.incremental {
        BackupType::Incremental
    } else {
        BackupType::Full
    };
    let parent = match kind {
        BackupType::Full => None,
        BackupType::Incremental => Some(choose_parent(repo, opts, &server, &target)?),
    };
    let parent_id = parent.as_ref().map(|p| p.id.clone());

    let tool_version = opts.pg_bin.version("pg_basebackup")?;
    let id = new_id(repo, kind)?;
    let mut label = BackupLabel {
        format: LABEL_FORMAT,
        id: id.clone(),
        cluster_name: opts.cluster_name.clone().unwrap_or_else(|| {
            match server.cluster_name.as_str() {
                "" => "default".to_owned(),
                name => name.to_owned(),
            }
        }),
        pg_version: server.major,
        system_identifier: server.system_identifier.clone(),
        kind,
        parent: parent_id,
        status: BackupStatus::Running,
        failure: None,
        start_lsn: None,
        stop_lsn: None,
        timeline: None,
        wal_ranges: Vec::new(),
        wal_segment_size: server.seg_size,
        start_time: now_rfc3339(),
        stop_time: None,
        size_bytes: 0,
        file_count: 0,
        stored_bytes: None,
        encryption: None,
        tool_version: format!("reentry {}; {tool_version}", env!("CARGO_PKG_VERSION")),
        verification: None,
        objects: Default::default(),
        signature: None,
    };
    // On object storage the label is written once, when the backup ends.
    let local = repo.local_root().is_some();
    if local {
        repo.save_label(&label)?;
    }
    tracing::info!(id = %id, kind = ?kind, target = %target, "backup started");

    let result = match copy_and_settle(repo, opts, &mut label, parent.as_ref()) {
        Ok(()) => {
            label.status = BackupStatus::Complete;
            Ok(repo.save_label(&label)?)
        }
        Err(e) => {
            label.status = BackupStatus::Failed;
            label.failure = Some(e.to_string());
            label.stop_time.get_or_insert_with(now_rfc3339);
            repo.save_label(&label)?;
            Err(e)
        }
    };
    // Run as root, pg_basebackup leaves files only root can read; a restore
    // runs as the server's user, who owns the repository.
    if let Some(root) = repo.local_root().filter(|_| fsutil::running_as_root()) {
        let dir = repo.backup_dir(&id)?;
        fsutil::chown_tree_like(&dir, root).map_err(crate::backup::repo::io_err("chown", &dir))?;
    }
    result
}

fn choose_parent(
    repo: &Repo,
    opts: &BackupOptions,
    server: &Server,
    target: &str,
) -> Result<BackupLabel, BackupError> {
    if server.major < 17 {
        return Err(BackupError::IncrementalUnsupported {
            version: server.major,
        });
    }
    if server.summarize_wal.as_deref() != Some("on") {
        return Err(BackupError::SummarizeWalOff {
            target: target.to_owned(),
        });
    }
    let label = match &opts.parent {
        Some(id) => repo.trusted_label(id)?,
        None => repo
            .backups()?
            .into_iter()
            .rev()
            .find(|b| b.is_usable() && b.system_identifier == server.system_identifier)
            .ok_or_else(|| BackupError::NoParent {
                system: server.system_identifier.clone(),
                repo: repo.location(),
            })?,
    };
    let bad = |why: String| BackupError::BadParent {
        parent: label.id.clone(),
        why,
    };
    if !label.is_usable() {
        return Err(bad(
            format!("it is {:?}, not complete", label.status).to_lowercase()
        ));
    }
    if label.system_identifier != server.system_identifier {
        return Err(bad(format!(
            "it is of system {}, the server is {}",
            label.system_identifier, server.system_identifier
        )));
    }
    Ok(label)
}

fn copy_and_settle(
    repo: &Repo,
    opts: &BackupOptions,
    label: &mut BackupLabel,
    parent: Option<&BackupLabel>,
) -> Result<(), BackupError> {
    // On object storage, and in a local repository with recipients,
    // pg_basebackup writes to a scratch directory, which is then packed
    // (and encrypted) into the repository: its data in plain files would
    // be readable by whoever reads the repository, which encryption is
    // meant to prevent.
    // The whole cluster lands there: $TMPDIR is often a small tmpfs, hence
    // --scratch.
    let packed_here = repo.local_root().is_none() || repo.keys().to.is_some();
    let scratch = if packed_here {
        let dir = opts.scratch.clone().unwrap_or_else(std::env::temp_dir);
        Some(ScratchDir::beside(&dir.join("reentry-backup")).map_err(
            crate::backup::repo::io_err("create a scratch directory in", &dir),
        )?)
    } else {
        None
    };
    let data = match &scratch {
        Some(s) => s.path().join("data"),
        None => repo.backup_dir(&label.id)?.join("data"),
    };
    let mut cmd = opts.pg_bin.command("pg_basebackup");
    cmd.arg("-D")
        .arg(&data)
        // Streaming its own WAL makes the server skip waiting for the archive,
        // which with -X none it does forever when archive_command fails; the
        // archive is checked here instead, within --archive-timeout.
        .args([
            "-X",
            "stream",
            "-c",
            "fast",
            "--manifest-checksums=SHA256",
            "--no-password",
        ])
        .arg(format!("--label=reentry {}", label.id));
    // Secrets go through the environment and a private service file, not
    // the command line.
    let _tool_conn = match &opts.conninfo {
        Some(c) => {
            let t = crate::pg::conn::ToolConn::new(c).map_err(crate::backup::repo::io_err(
                "write a service file in",
                &std::env::temp_dir(),
            ))?;
            cmd.arg("-d").arg(&t.conninfo);
            cmd.envs(t.env.iter().map(|(k, v)| (*k, v)));
            Some(t)
        }
        None => None,
    };
    // A packed parent (on object storage, or copied from there) lends its
    // manifest through a scratch file; so does a signed plain one, the
    // manifest its label vouches for, as read once: the repository's file
    // may have changed since.
    let mut parent_scratch = None;
    if let Some(p) = parent {
        let plain = repo.plain_backup(p)?;
        let manifest = match &plain {
            Some(crate::backup::repo::PlainBackup {
                data,
                vouched: None,
            }) => data.join("backup_manifest"),
            _ => {
                let s: &ScratchDir = parent_scratch.insert(
                    ScratchDir::new("reentry-parent").map_err(crate::backup::repo::io_err(
                        "create a scratch directory in",
                        &std::env::temp_dir(),
                    ))?,
                );
                let m = s.path().join("backup_manifest");
                match &plain {
                    Some(crate::backup::repo::PlainBackup {
                        vouched: Some(v), ..
                    }) => std::fs::write(&m, v.bytes())
                        .map_err(crate::backup::repo::io_err("write", &m))?,
                    _ => packed::fetch_manifest(repo.store(), p, &m, repo.keys())?,
                }
                m
            }
        };
        cmd.arg(format!("--incremental={}", manifest.display()));
    }
    if opts.progress {
        cmd.arg("--progress").stderr(Stdio::inherit());
        let status = cmd.status().map_err(|source| ToolError::Spawn {
            program: opts.pg_bin.program("pg_basebackup"),
            source,
        })?;
        if !status.success() {
            return Err(tools::failed(
                Path::new("pg_basebackup"),
                &status,
                b"see its messages above",
            )
            .into());
        }
    } else {
        tools::run(&mut cmd)?;
    }

    read_backup_files(label, &data)?;
    label.stop_time = Some(now_rfc3339());
    let (bytes, files) =
        fsutil::tree_size(&data).map_err(crate::backup::repo::io_err("measure", &data))?;
    (label.size_bytes, label.file_count) = (bytes, files);
    if scratch.is_some() {
        let up = packed::upload(
            repo.store(),
            &label.id,
            &data,
            // Written just now by pg_basebackup, in a private scratch
            // directory.
            None,
            Form {
                compression: Compression::Zstd,
                level: opts.level,
                checksum: opts.checksum,
            },
            repo.keys(),
            opts.jobs,
            &*opts.reporter,
        )?;
        label.stored_bytes = Some(up.index.stored_bytes());
        label.encryption = repo.keys().to.as_ref().map(|r| r.describe());
        label.objects = up.objects;
    } else {
        // A plain backup's manifest, as its (signed) label vouches for it:
        // `Repo::plain_backup` refuses any other, and restore and copy
        // check each file against it as they read it (vouched.rs).
        let manifest = data.join(packed::MANIFEST_FILE);
        let bytes =
            std::fs::read(&manifest).map_err(crate::backup::repo::io_err("read", &manifest))?;
        label.objects = std::collections::BTreeMap::from([(
            packed::MANIFEST_FILE.to_owned(),
            crate::backup::stored::Checksum::of(crate::backup::stored::Algorithm::Sha256, &bytes),
        )]);
        repo.save_label(label)?;
    }
    wait_for_wal(repo, label, opts.archive_timeout)?;

    let info = repo.archive().info()?;
    if let Some(info) = info.filter(|i| i.system_identifier != label.system_identifier) {
        return Err(BackupError::WrongCluster {
            repo: repo.location(),
            target: label.cluster_name.clone(),
            archive: info.system_identifier,
            server: label.system_identifier.clone(),
        });
    }
    Ok(())
}

/// Start and stop LSN, timeline and WAL ranges, from `backup_label` and
/// `backup_manifest`.
fn read_backup_files(label: &mut BackupLabel, data: &Path) -> Result<(), BackupError> {
    let bad = |path: PathBuf, detail: String| BackupError::BadBackupFiles {
        id: label.id.clone(),
        path,
        detail,
    };
    let label_path = data.join("backup_label");
    let text =
        std::fs::read_to_string(&label_path).map_err(|e| bad(label_path.clone(), e.to_string()))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let start = field("START WAL LOCATION:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<Lsn>().ok())
        .ok_or_else(|| bad(label_path.clone(), "no START WAL LOCATION".into()))?;

    let manifest_path = data.join("backup_manifest");
    let manifest: serde_json::Value = std::fs::read(&manifest_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| bad(manifest_path.clone(), e))?;
    let ranges = manifest["WAL-Ranges"]
        .as_array()
        .ok_or_else(|| bad(manifest_path.clone(), "no WAL-Ranges".into()))?
        .iter()
        .map(|r| {
            Some(WalRange {
                timeline: r["Timeline"].as_u64()? as u32,
                start_lsn: r["Start-LSN"].as_str()?.parse().ok()?,
                end_lsn: r["End-LSN"].as_str()?.parse().ok()?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .filter(|r| !r.is_empty())
        .ok_or_else(|| bad(manifest_path.clone(), "malformed WAL-Ranges".into()))?;
    let last = *ranges.last().expect("not empty");
    label.start_lsn = Some(start);
    label.stop_lsn = Some(last.end_lsn);
    label.timeline = Some(last.timeline);
    label.wal_ranges = ranges;
    Ok(())
}

/// Waits until every segment from start to stop is archived and intact.
fn wait_for_wal(repo: &Repo, label: &BackupLabel, timeout: Duration) -> Result<(), BackupError> {
    let archive = repo.archive();
    let deadline = Instant::now() + timeout;
    for seg in label.required_segments() {
        let name = WalFileName::Segment(seg);
        loop {
            match archive.verify(&name) {
                Ok(_) => break,
                Err(ArchiveError::NotFound { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(ArchiveError::NotFound { .. }) => {
                    return Err(BackupError::WalTimeout {
                        id: label.id.clone(),
                        segment: name.to_string(),
                        secs: timeout.as_secs(),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
