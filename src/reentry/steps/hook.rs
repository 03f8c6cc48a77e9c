//! A playbook's shell command (`rebuild-hook`), run so that it cannot
//! outlive reentry, hang it, or fill its memory:
//! - in a process group of its own, which is what is stopped: `sh -c` and
//!   everything it started;
//! - stopped on Ctrl-C (the run's `interrupted` flag: SIGTERM, then
//!   SIGKILL after `GRACE`), at its timeout, and, should reentry be told to
//!   stop at once (a second Ctrl-C), by `kill_running` before it exits;
//! - journaled by its process group as soon as it starts (`Group`), so that
//!   a run resumed after reentry itself was killed stops a hook the dead
//!   run left behind (`stop_left`) before it starts another;
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

/// A hook's process group, as it can be told apart from a later one with
/// the same number: its leader's start time (clock ticks since boot) and
/// the boot.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    pub pgid: i32,
    pub leader_start: u64,
    pub boot_id: String,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Fields of `/proc/PID/stat` after the command's closing parenthesis:
/// [0] is the state, [2] the process group, [19] the start time.
fn stat(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

impl Group {
    fn of(pid: i32) -> Option<Group> {
        let f = stat(pid)?;
        Some(Group {
            pgid: pid,
            leader_start: f.get(19)?.parse().ok()?,
            boot_id: boot_id(),
        })
    }

    /// The live processes of this group (zombies aside): none when it is
    /// gone, or when its number now belongs to another group (its leader
    /// started at another time, or the machine booted since).
    fn members(&self) -> Vec<i32> {
        if self.boot_id != boot_id() {
            return Vec::new();
        }
        // While any process is in a group, the kernel gives nobody else
        // its number: with the leader gone, the members are this group's.
        if let Some(f) = stat(self.pgid) {
            if f.get(19).and_then(|t| t.parse::<u64>().ok()) != Some(self.leader_start) {
                return Vec::new();
            }
        }
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| {
                stat(pid).is_some_and(|f| {
                    f.first().map(String::as_str) != Some("Z")
                        && f.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(self.pgid)
                })
            })
            .collect()
    }
}

/// Stops what is left of `group` (a hook of a run that died), SIGTERM then
/// SIGKILL after `GRACE`; whether anything was.
pub fn stop_left(group: &Group) -> bool {
    if group.members().is_empty() {
        return false;
    }
    // SAFETY: kill(2) of a process group that is, by `members`, this one.
    unsafe { libc::kill(-group.pgid, libc::SIGTERM) };
    let since = Instant::now();
    while since.elapsed() < GRACE && !group.members().is_empty() {
        std::thread::sleep(POLL);
    }
    if !group.members().is_empty() {
        unsafe { libc::kill(-group.pgid, libc::SIGKILL) };
    }
    true
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
/// closed, until it exits, `timeout` passes or `interrupted` is set;
/// `started` is given its process group first thing (to journal it).
pub fn run(
    command: &str,
    dir: &std::path::Path,
    env: &[(String, std::ffi::OsString)],
    timeout: Duration,
    interrupted: &AtomicBool,
    started: impl FnOnce(&Group) -> std::io::Result<()>,
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
    let group = Group::of(child.id() as i32).unwrap_or(Group {
        pgid: child.id() as i32,
        leader_start: 0,
        boot_id: boot_id(),
    });
    if let Err(e) = started(&group) {
        stop(&mut child);
        RUNNING.store(0, Ordering::SeqCst);
        return Err(e);
    }
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
            |_| Ok(()),
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
        let ran = run(
            &script,
            &dir,
            &path(),
            Duration::from_secs(60),
            &flag,
            |_| Ok(()),
        )
        .unwrap();
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
            |_| Ok(()),
        )
        .unwrap();
        assert!(matches!(ran.end, End::Exited(s) if s.success()), "{ran:?}");
        assert_eq!(ran.output.len(), KEPT + "done\n".len());
        assert!(ran.output.ends_with("done\n"));
    }

    /// A group left by a run that died is found by what was journaled and
    /// stopped; one whose number was reused is not this one.
    #[test]
    fn a_group_left_behind_is_stopped_and_a_reused_number_is_not_it() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 300 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let group = Group::of(child.id() as i32).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(group.members().len(), 2, "sh and its sleep");
        let other = Group {
            leader_start: group.leader_start + 1,
            ..group.clone()
        };
        assert!(
            other.members().is_empty(),
            "another start time, another group"
        );
        assert!(stop_left(&group));
        let _ = child.wait();
        assert!(group.members().is_empty());
        assert!(!stop_left(&group), "nothing left the second time");
    }
}
