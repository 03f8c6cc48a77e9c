//! Test harness: a throwaway PostgreSQL cluster per test, the `reentry`
//! binary as the server's OS user sees it, and names for the shared Redis and
//! Kafka servers that `scripts/test` starts.

pub mod archiving;
pub mod pg;
pub mod quartz;
pub mod redis;
pub mod s3proxy;
pub mod search;
pub mod services;
pub mod tls;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// A name no other test in this run (or a concurrent run) uses.
pub fn unique(prefix: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A new bucket or container name: `unique`, in the letters S3 and Azure
/// both accept.
pub fn bucket_name(test: &str) -> String {
    unique(test)
        .to_lowercase()
        .replace(['_', '.'], "-")
        .chars()
        .take(60)
        .collect()
}

/// `(uid, gid)` to run PostgreSQL as, when the tests run as root (the server
/// refuses root). The user comes from `REENTRY_PG_USER`, default `reentry`,
/// which `scripts/setup` creates.
pub fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .expect("Uid line in /proc/self/status");
        if euid != "0" {
            return None;
        }
        let name = std::env::var("REENTRY_PG_USER").unwrap_or_else(|_| "reentry".into());
        let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let entry = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == name)
            .unwrap_or_else(|| {
                panic!("tests run as root and PostgreSQL refuses root, but OS user {name:?} does not exist: run scripts/setup")
            });
        Some((entry[2].parse().unwrap(), entry[3].parse().unwrap()))
    })
}

/// Makes `path` belong to the server user, so the server and the archive
/// command it runs can write there.
/// Writes a secret (an age identity) as its owner's alone, 0600: reentry
/// refuses one others can read.
pub fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A new label signing key pair from `reentry repo keygen`, run as the
/// server user into `dir`: the private key's path (0600, the server user's)
/// and the public key it printed, which is all it printed of the pair.
pub fn signing_key(dir: &Path) -> (PathBuf, String) {
    let file = dir.join(unique("signing")).with_extension("pem");
    let out = as_server_user(reentry_bin())
        .args(["--json", "repo", "keygen", "--out"])
        .arg(&file)
        .env_remove("REENTRY_REPO")
        .output()
        .expect("run reentry repo keygen");
    assert_exit(&out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let public = v["public_key"].as_str().unwrap().to_owned();
    assert!(public.starts_with("ed25519:"), "{v}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the private key is its owner's alone");
    for secret in private_key_lines(&file) {
        assert!(
            !stdout(&out).contains(&secret) && !stderr(&out).contains(&secret),
            "keygen printed the private key"
        );
    }
    (file, public)
}

/// The base64 lines of a PEM private key: what must never be printed.
pub fn private_key_lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

pub fn give_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A command that runs as the server user.
pub fn as_server_user(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = server_user() {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// The `reentry` binary under test, at a path the server user can execute:
/// the build directory may sit under a home directory only root can enter.
pub fn reentry_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // REENTRY_TEST_BIN runs the suite against another build, e.g. an
        // older one, to measure what a change fixed.
        let built = std::env::var_os("REENTRY_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_reentry")));
        if server_user().is_none() {
            return built;
        }
        let meta = std::fs::metadata(&built).expect("stat the reentry binary");
        let dir = std::env::temp_dir().join("reentry-it-bin");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let stamp = meta
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let copy = dir.join(format!("reentry-{}-{stamp}", meta.len()));
        if !copy.exists() {
            let tmp = dir.join(unique(".copy"));
            std::fs::copy(&built, &tmp).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::rename(&tmp, &copy).unwrap();
        }
        // Copies of earlier builds (200 MB each) go once no run can still
        // be using them: an hour is several whole test runs.
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let old = entry.metadata().ok().and_then(|m| m.modified().ok());
            if entry.path() != copy
                && old.is_some_and(|t| {
                    t.elapsed().unwrap_or_default() > std::time::Duration::from_secs(3600)
                })
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        copy
    })
}

/// Runs `reentry` with `args` (as the server user when `as_server` is set).
pub fn reentry(as_server: bool, args: &[&str]) -> Output {
    let mut cmd = if as_server {
        as_server_user(reentry_bin())
    } else {
        Command::new(reentry_bin())
    };
    cmd.args(args).env_remove("REENTRY_REPO");
    cmd.output().expect("run reentry")
}

/// Runs `reentry` with `args` (paths or strings), as this process's user.
pub fn run_reentry(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(reentry_bin());
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("run reentry")
}

/// Starts every command at once (their output piped), then waits for all:
/// racing processes, as PostgreSQL's archiver retries can be.
pub fn run_concurrently(cmds: impl IntoIterator<Item = Command>) -> Vec<Output> {
    let children: Vec<_> = cmds
        .into_iter()
        .map(|mut c| {
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start a racing process")
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait for a racing process"))
        .collect()
}

/// How many `wal push --json` outputs, all of which exited 0, say they
/// stored the file (the others found it archived).
#[track_caller]
pub fn pushes_that_stored(outputs: &[Output]) -> usize {
    for o in outputs {
        assert_exit(o, 0);
    }
    outputs
        .iter()
        .filter(|o| stdout(o).contains(r#""outcome":"stored""#))
        .count()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts the exit code, showing both outputs when it differs.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {:?}; stderr:\n{}\nstdout:\n{}",
        o.status,
        stderr(o),
        stdout(o)
    );
}
pub mod restored;

/// Runs `cmd` (an `apply`) until it stops at the test hook's pause
/// `point` (`STEP:POINT`), then kills it there with SIGKILL. Panics with
/// what it printed when it never gets there.
#[track_caller]
pub fn kill_at_pause(mut cmd: Command, point: &str) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .env("REENTRY_PAUSE_AT", point)
        .env("REENTRY_TEST_HOOKS", "hang-at-pause-points")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("paused at") {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return;
        }
    }
    let status = child.wait().unwrap();
    panic!("apply never reached {point} ({status}): {seen}");
}
