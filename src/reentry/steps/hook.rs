//! A playbook's shell command (`rebuild-hook`), run so that it cannot
//! outlive reentry, hang it, or fill its memory:
//! - in a process group of its own, which is what is stopped: `sh -c` and
//!   everything it started;
//! - stopped on Ctrl-C (the run's `interrupted` flag: SIGTERM, then
//!   SIGKILL after `GRACE`), at its timeout, and, should reentry be told to
//!   stop at once (a second Ctrl-C), by `kill_running` before it exits;
//! - its output read while it runs, up to `KEPT` bytes of each stream (the
//!   rest is drained, so a chatty hook never blocks on a full pipe), and no
//!   longer than `LINGER` after it exits: a process it left in the
//!   background (`nohup … &`) may hold the pipes open for hours.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Output kept of each stream.
const KEPT: usize = 64 * 1024;
/// How long a stopped hook gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// How long its output is read after it exits.
const LINGER: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(50);

/// The process group of the hook running now (0: none).
static RUNNING: AtomicI32 = AtomicI32::new(0);

/// Kills the running hook's process group, if there is one: for a process
/// about to exit at once, so that no hook outlives it.
pub fn kill_running() {
    let group = RUNNING.swap(0, Ordering::SeqCst);
    if group > 0 {
        // SAFETY: kill(2) with a negative pid signals that process group.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
}

/// How a hook ended.
#[derive(Debug)]
pub enum End {
    Exited(ExitStatus),
    /// Stopped at its timeout.
    TimedOut,
    /// Stopped because the run was interrupted.
    Interrupted,
}

#[derive(Debug)]
pub struct Ran {
    pub end: End,
    /// Its stdout, then its stderr, each cut at `KEPT` bytes.
    pub output: String,
    /// Its output was still open `LINGER` after it exited.
    pub left_running: bool,
}

/// A stream read into a buffer of at most `KEPT` bytes, drained to its end.
fn reader(mut r: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let into = Arc::clone(&buf);
    let handle = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let mut b = into.lock().unwrap_or_else(|e| e.into_inner());
            let room = KEPT.saturating_sub(b.len()).min(n);
            b.extend_from_slice(&chunk[..room]);
        }
    });
    (buf, handle)
}

/// Stops `child`'s process group: SIGTERM, then SIGKILL once `GRACE` has
/// passed with `child` still running.
fn stop(child: &mut Child) {
    let group = child.id() as i32;
    // SAFETY: as in kill_running.
    unsafe { libc::kill(-group, libc::SIGTERM) };
    let since = Instant::now();
    while since.elapsed() < GRACE {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(POLL);
    }
    // Whatever of the group is left, the shell included.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let _ = child.wait();
}

/// Runs `sh -c command` in `dir` with no environment but `env`, stdin
/// closed, until it exits, `timeout` passes or `interrupted` is set.
pub fn run(
    command: &str,
    dir: &std::path::Path,
    env: &[(String, std::ffi::OsString)],
    timeout: Duration,
    interrupted: &AtomicBool,
) -> std::io::Result<Ran> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    RUNNING.store(child.id() as i32, Ordering::SeqCst);
    let (out, out_done) = reader(child.stdout.take().expect("piped"));
    let (err, err_done) = reader(child.stderr.take().expect("piped"));
    let started = Instant::now();
    let end = loop {
        match child.try_wait() {
            Ok(Some(status)) => break End::Exited(status),
            Ok(None) => {}
            Err(e) => {
                stop(&mut child);
                RUNNING.store(0, Ordering::SeqCst);
                return Err(e);
            }
        }
        if interrupted.load(Ordering::SeqCst) {
            stop(&mut child);
            break End::Interrupted;
        }
        if started.elapsed() >= timeout {
            stop(&mut child);
            break End::TimedOut;
        }
        std::thread::sleep(POLL);
    };
    RUNNING.store(0, Ordering::SeqCst);
    let exited = Instant::now();
    while !(out_done.is_finished() && err_done.is_finished()) && exited.elapsed() < LINGER {
        std::thread::sleep(POLL);
    }
    let left_running = !(out_done.is_finished() && err_done.is_finished());
    let text = |b: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    };
    let mut output = text(&out);
    output.push_str(&text(&err));
    Ok(Ran {
        end,
        output,
        left_running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> Vec<(String, std::ffi::OsString)> {
        vec![("PATH".into(), std::env::var_os("PATH").unwrap_or_default())]
    }

    /// Whether `pid` runs: neither gone nor a zombie waiting to be reaped.
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        })
    }

    #[test]
    fn a_background_process_holding_the_output_does_not_hang_the_hook() {
        let dir = std::env::temp_dir();
        let ran = run(
            "echo started; sleep 30 & echo $! ; exit 0",
            &dir,
            &path(),
            Duration::from_secs(60),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(matches!(ran.end, End::Exited(s) if s.success()), "{ran:?}");
        assert!(ran.left_running, "{ran:?}");
        let pid: i32 = ran.output.lines().nth(1).unwrap().trim().parse().unwrap();
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    #[test]
    fn an_interrupted_hook_is_stopped_with_everything_it_started() {
        let dir = std::env::temp_dir();
        let flag = Arc::new(AtomicBool::new(false));
        let set = Arc::clone(&flag);
        let marker = dir.join(format!("reentry-hook-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let script = format!("sleep 300 & echo $! > {}; wait", marker.display());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            set.store(true, Ordering::SeqCst);
        });
        let ran = run(&script, &dir, &path(), Duration::from_secs(60), &flag).unwrap();
        assert!(matches!(ran.end, End::Interrupted), "{ran:?}");
        let pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _ = std::fs::remove_file(&marker);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !alive(pid),
            "the hook's child {pid} outlived the interruption"
        );
    }

    #[test]
    fn output_beyond_what_is_kept_is_drained_not_held() {
        let ran = run(
            "head -c 10000000 /dev/zero | tr '\\0' x; echo done >&2",
            &std::env::temp_dir(),
            &path(),
            Duration::from_secs(60),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(matches!(ran.end, End::Exited(s) if s.success()), "{ran:?}");
        assert_eq!(ran.output.len(), KEPT + "done\n".len());
        assert!(ran.output.ends_with("done\n"));
    }
}
