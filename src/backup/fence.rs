//! The fence around a restored copy. The copy runs on the restore host,
//! which holds the age identity, from files the source wrote: its
//! settings are appended to, so that none of the source's commands, code
//! or background jobs runs there and nothing reaches production, and what
//! no setting can switch off is refused before the copy starts.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::pg::conn::{Db, PgError};
use crate::pg::tools::{self, PgBin, ToolError};

/// Preloaded libraries that start no background job of their own
/// (pg_prewarm's is switched off below) and reach no other system: a copy
/// of a source that loads them starts without `--allow-preload`.
pub const PASSIVE: &[&str] = &[
    "pg_stat_statements",
    "auto_explain",
    "pg_prewarm",
    "pgaudit",
    "pg_hint_plan",
    "pg_wait_sampling",
    "pg_stat_kcache",
    "passwordcheck",
    "auth_delay",
];

/// pg_cron is kept when the library on this host has the switch the copy
/// turns off, `cron.launch_active_jobs` (pg_cron 1.6 and later).
pub const PG_CRON: &str = "pg_cron";
const CRON_SWITCH: &str = "cron.launch_active_jobs";

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error(
        "{setting} of the backup names {entry:?}, a path: the copy would load code from \
         wherever it points (the data directory included) on this host, which holds the \
         identity. Nothing was started. Name the library without a directory or `$libdir` \
         in the source, or restore by hand"
    )]
    LibraryPath {
        setting: &'static str,
        entry: String,
    },
    #[error("{setting} of the backup cannot be read as a list: {value:?}")]
    BadList {
        setting: &'static str,
        value: String,
    },
    #[error(
        "the backup preloads {} (shared_preload_libraries): a background worker of one may act \
         as soon as the copy starts or is promoted. Nothing was started. Pass --allow-preload \
         NAME for each you accept; without it reentry keeps only {}, and pg_cron 1.6 or later",
        names.join(", "),
        PASSIVE.join(", ")
    )]
    Preload { names: Vec<String> },
    #[error(
        "the backup preloads pg_cron, and {why} ({}): the copy cannot turn its jobs off \
         (cron.launch_active_jobs came with pg_cron 1.6), so they would run once it is \
         promoted. Nothing is left running. Install pg_cron 1.6 or later here, or pass \
         --allow-preload pg_cron to let the jobs run",
        library.display()
    )]
    Cron { library: PathBuf, why: String },
    #[error(
        "the backup's configuration sets data_directory = {found:?}: started, the copy would \
         run on that directory instead of {}. Nothing was started. Remove the setting from the \
         backup's postgresql.conf, or restore by hand",
        to.display()
    )]
    DataDirectory { found: String, to: PathBuf },
    #[error(
        "the backup has no pg_hba.conf (the source kept its rules outside its data directory, \
         as Debian's layout does), so --listen has no rules of the source's to open the copy \
         with. Nothing was started. Restore without --listen (fenced), then write the copy's \
         pg_hba.conf, set listen_addresses and restart it"
    )]
    NoSourceHba,
    #[error(
        "{} in backup {id} is a symbolic link to {to}: a restore would copy it, and then write \
         through it outside the target. Nothing was copied. A backup pg_basebackup wrote has \
         none; this one was changed after it was taken",
        path.display()
    )]
    Link {
        id: String,
        path: PathBuf,
        to: String,
    },
    #[error(
        "the copy's databases or roles set {} (ALTER DATABASE/ROLE … SET): every session \
         opened on the copy would load code from wherever it points, on this host, which holds \
         the identity. reentry's own sessions override it; the copy was stopped. Reset it on \
         the source (ALTER DATABASE … RESET …), take a new backup, or restore by hand",
        found.join("; ")
    )]
    RoleSettings { found: Vec<String> },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Pg(#[from] PgError),
}

impl FenceError {
    /// A refusal (exit 3), not a malfunction.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            FenceError::Io { .. } | FenceError::Tool(_) | FenceError::Pg(_)
        )
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FenceError + 'a {
    move |source| FenceError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The settings appended after the copy's own (and after reentry's
/// archive, replication and connection settings), for PostgreSQL `major`:
/// a setting a version does not know stops its server, so each is
/// appended only where it exists. Settings with a dotted prefix are kept
/// by PostgreSQL as placeholders where no library defines them.
pub fn settings(major: u32) -> Vec<String> {
    let mut s: Vec<&str> = vec![
        // The source's code stays with the source: no passphrase command,
        // no library from a path the source chose, no JIT provider but the
        // server's own.
        "ssl = off",
        "ssl_passphrase_command = ''",
        "session_preload_libraries = ''",
        "local_preload_libraries = ''",
        "dynamic_library_path = '$libdir'",
        "jit = off",
        "jit_provider = 'llvmjit'",
        // The log goes to reentry's file, not into the source's log
        // directory or syslog; no pid file where the source kept one.
        "logging_collector = off",
        "log_destination = 'stderr'",
        "external_pid_file = ''",
        "bonjour = off",
        // Background workers of extensions, where the source loads them.
        "pg_prewarm.autoprewarm = off",
        "timescaledb.max_background_workers = 0",
        "citus.recover_2pc_interval = -1",
        "citus.distributed_deadlock_detection_factor = -1",
    ];
    if major >= 17 {
        s.push("event_triggers = off");
    }
    if major >= 18 {
        s.push("extension_control_path = '$system'");
    }
    s.into_iter().map(str::to_owned).collect()
}

/// A list setting as PostgreSQL splits it (SplitDirectoriesString):
/// comma-separated, names optionally double-quoted with `""` for a quote.
/// None when PostgreSQL would not read it either.
pub fn split_list(s: &str) -> Option<Vec<String>> {
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    let skip = |i: &mut usize| {
        while *i < b.len() && b[*i].is_whitespace() {
            *i += 1;
        }
    };
    let mut out = Vec::new();
    skip(&mut i);
    if i == b.len() {
        return Some(out);
    }
    loop {
        let mut name = String::new();
        if b[i] == '"' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return None,
                    Some('"') if b.get(i + 1) == Some(&'"') => {
                        name.push('"');
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(c) => {
                        name.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && b[i] != ',' {
                name.push(b[i]);
                i += 1;
            }
            name = name.trim_end().to_owned();
            if name.is_empty() {
                return None;
            }
        }
        skip(&mut i);
        out.push(name);
        match b.get(i) {
            None => return Some(out),
            Some(',') => {
                i += 1;
                skip(&mut i);
            }
            Some(_) => return None,
        }
    }
}

/// Refuses a plain backup with anything but directories and regular
/// files in it: a link would be copied as a link, and the writes that
/// configure the copy would go through it.
pub fn check_plain(id: &str, dir: &Path) -> Result<(), FenceError> {
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in fs::read_dir(&d).map_err(io_err("read", &d))? {
            let entry = entry.map_err(io_err("read", &d))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io_err("read", &path))?;
            if kind.is_dir() {
                dirs.push(path);
            } else if !kind.is_file() {
                let to = fs::read_link(&path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "a file that is neither a directory nor a file".into());
                return Err(FenceError::Link {
                    id: id.to_owned(),
                    path: path.strip_prefix(dir).unwrap_or(&path).to_owned(),
                    to,
                });
            }
        }
    }
    Ok(())
}

/// What the copy must show once it answers, before it may open.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// pg_cron is loaded: its switch must be a real setting, and off.
    pub cron: bool,
}

/// One setting as the server would read it at start (`postgres -C`),
/// without starting it: no library is loaded for that.
fn show(pg_bin: &PgBin, to: &Path, name: &str) -> Result<String, FenceError> {
    let out = tools::run(
        pg_bin
            .command("postgres")
            .arg("-C")
            .arg(name)
            .arg("-D")
            .arg(to),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Checks, before the copy in `to` (configured, canonical) is started, what
/// its settings would make it do: run on another directory, load code
/// from a path, or start background workers that no setting switches off.
/// `allowed` are the preloaded libraries the operator accepts.
pub fn check_config(
    pg_bin: &PgBin,
    to: &Path,
    major: u32,
    allowed: &[String],
) -> Result<Checked, FenceError> {
    let found = show(pg_bin, to, "data_directory")?;
    if fs::canonicalize(&found).ok().as_deref() != Some(to) {
        return Err(FenceError::DataDirectory {
            found,
            to: to.to_owned(),
        });
    }
    let mut lists = vec!["shared_preload_libraries"];
    if major >= 18 {
        // Loaded when an `oauth` line of pg_hba.conf (with --listen, the
        // source's) authenticates someone.
        lists.push("oauth_validator_libraries");
    }
    let mut preloaded = Vec::new();
    for setting in lists {
        let value = show(pg_bin, to, setting)?;
        let names = split_list(&value).ok_or_else(|| FenceError::BadList {
            setting,
            value: value.clone(),
        })?;
        if let Some(entry) = names.iter().find(|n| n.contains(['/', '$'])) {
            return Err(FenceError::LibraryPath {
                setting,
                entry: entry.clone(),
            });
        }
        if setting == "shared_preload_libraries" {
            preloaded = names;
        }
    }
    let refused: Vec<String> = preloaded
        .iter()
        .filter(|n| !PASSIVE.contains(&n.as_str()) && *n != PG_CRON && !allowed.contains(n))
        .cloned()
        .collect();
    if !refused.is_empty() {
        return Err(FenceError::Preload { names: refused });
    }
    let cron = preloaded.iter().any(|n| n == PG_CRON) && !allowed.iter().any(|n| n == PG_CRON);
    if cron {
        // The copy sets cron.launch_active_jobs off; a pg_cron without it
        // keeps it as a placeholder and runs its jobs. Its launcher starts
        // only once recovery has ended: whether the library here has the
        // switch is read from the library itself, before the copy starts
        // (and from the server, once it answers).
        let out = tools::run(pg_bin.command("pg_config").arg("--pkglibdir"))?;
        let library = Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("pg_cron.so");
        let why = match fs::read(&library) {
            Ok(bytes) => (!bytes
                .windows(CRON_SWITCH.len())
                .any(|w| w == CRON_SWITCH.as_bytes()))
            .then(|| format!("the pg_cron library here has no {CRON_SWITCH}")),
            Err(e) => Some(format!("the pg_cron library cannot be read: {e}")),
        };
        if let Some(why) = why {
            return Err(FenceError::Cron { library, why });
        }
    }
    Ok(Checked { cron })
}

/// Startup options for every session reentry opens on a copy: settings a
/// session receives when it starts outrank those of `ALTER DATABASE` and
/// `ALTER ROLE … SET`, which the copy's configuration cannot reach, so no
/// library they name is loaded into reentry's sessions. A superuser's:
/// `session_preload_libraries` and `dynamic_library_path` are theirs to set.
pub const SESSION_OPTIONS: &str = "options='-c session_preload_libraries= -c local_preload_libraries= -c dynamic_library_path=$libdir'";

/// The settings of the copy's databases and roles (`pg_db_role_setting`)
/// that load code from a path into every session: a preloaded library
/// named with a `/` or a `$`, or a `dynamic_library_path` other than
/// `$libdir`. Each as `database/role: name=value`.
fn role_settings(db: &mut Db) -> Result<Vec<String>, FenceError> {
    let rows = db.query(
        "read the databases' and roles' settings",
        "SELECT coalesce(d.datname, '*') || '/' || coalesce(r.rolname, '*') || ': ' || c
           FROM pg_catalog.pg_db_role_setting s
           LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
           LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole,
                pg_catalog.unnest(s.setconfig) c
          WHERE (c ~* '^(session|local)_preload_libraries=' AND c ~ '[/$]')
             OR (c ~* '^dynamic_library_path=' AND c !~* '^dynamic_library_path=[$]libdir$')
          ORDER BY 1",
        &[],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Checks a started copy before it is used: no database or role setting
/// loads code from a path into its sessions; and pg_cron's switch is a
/// setting the loaded library defined (a placeholder is not in
/// pg_settings), and it is off.
pub fn check_running(db: &mut Db, checked: &Checked) -> Result<(), FenceError> {
    let found = role_settings(db)?;
    if !found.is_empty() {
        return Err(FenceError::RoleSettings { found });
    }
    if !checked.cron {
        return Ok(());
    }
    let rows = db.query(
        "read pg_cron's switch",
        "SELECT setting FROM pg_settings WHERE name = $1",
        &[&CRON_SWITCH],
    )?;
    let setting: Option<String> = rows.first().map(|r| r.get(0));
    match setting.as_deref() {
        Some("off") => Ok(()),
        other => Err(FenceError::Cron {
            library: PathBuf::from("pg_cron"),
            why: match other {
                None => format!("the loaded pg_cron does not define {CRON_SWITCH}"),
                Some(v) => format!("{CRON_SWITCH} is {v} on the started copy"),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_as_postgresql_splits_them() {
        assert_eq!(split_list("").unwrap(), Vec::<String>::new());
        assert_eq!(split_list("  ").unwrap(), Vec::<String>::new());
        assert_eq!(
            split_list(r#""./x", pg_stat_statements, "$libdir/y", "a b", "Q,r", "q""t""#).unwrap(),
            [
                "./x",
                "pg_stat_statements",
                "$libdir/y",
                "a b",
                "Q,r",
                "q\"t"
            ]
        );
        assert_eq!(split_list("a ,b").unwrap(), ["a", "b"]);
        assert_eq!(split_list(r#""unterminated"#), None);
        assert_eq!(split_list("a,,b"), None);
        assert_eq!(split_list(r#""a" b"#), None);
    }

    #[test]
    fn settings_a_version_lacks_are_not_appended() {
        let has = |major, name: &str| {
            settings(major)
                .iter()
                .any(|l| l.starts_with(&format!("{name} =")))
        };
        assert!(!has(15, "event_triggers") && has(17, "event_triggers"));
        assert!(!has(17, "extension_control_path") && has(18, "extension_control_path"));
        assert!(has(15, "ssl_passphrase_command"));
    }
}
