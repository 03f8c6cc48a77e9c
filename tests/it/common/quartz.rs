//! A real Quartz 2.3 scheduler (Debian's libquartz2-java, clustered, JDBC
//! job store on PostgreSQL) driven through `lab/quartz/QuartzLab.java`,
//! which `scripts/setup` compiles. Its run log is the evidence: one line per
//! job run, written by the job itself.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

fn lab_dir() -> PathBuf {
    let dir = std::env::var_os("REENTRY_QUARTZ_LAB").map(PathBuf::from).unwrap_or_else(|| {
        panic!("REENTRY_QUARTZ_LAB is not set: run the tests through scripts/test, which compiles lab/quartz with javac")
    });
    assert!(
        dir.join("QuartzLab.class").is_file(),
        "{} holds no compiled QuartzLab: run scripts/setup",
        dir.display()
    );
    dir
}

fn classpath() -> String {
    let jars = std::env::var("REENTRY_QUARTZ_CP").unwrap_or_else(|_| {
        panic!("REENTRY_QUARTZ_CP is not set: run the tests through scripts/test")
    });
    format!("{}:{jars}", lab_dir().display())
}

/// Quartz's own `tables_postgres.sql`, from its jar.
pub fn schema() -> String {
    std::fs::read_to_string(lab_dir().join("tables_postgres.sql"))
        .expect("read tables_postgres.sql")
}

/// One job run, as the job logged it.
#[derive(Debug, Clone)]
pub struct Run {
    /// When Quartz fired the trigger (inside its TRIGGER_ACCESS lock), ms.
    pub fired_ms: i64,
    /// GROUP.NAME
    pub trigger: String,
    /// The scheduler instance that ran it.
    pub instance: String,
    /// The job's GROUP.NAME.
    pub job: String,
    /// Quartz re-fired it after the instance running it failed.
    pub recovering: bool,
}

impl Run {
    pub fn group(&self) -> &str {
        self.trigger.split('.').next().unwrap_or("")
    }
}

pub fn runs(log: &Path) -> Vec<Run> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() >= 4).then(|| Run {
                fired_ms: f[0].parse().unwrap(),
                trigger: f[3].to_owned(),
                instance: f.get(4).unwrap_or(&"").to_string(),
                job: f.get(5).unwrap_or(&f[3]).to_string(),
                recovering: f.get(6) == Some(&"true"),
            })
        })
        .collect()
}

pub struct Scheduler {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub log: PathBuf,
}

impl Scheduler {
    /// Starts scheduler `name` against `jdbc_url`, with Quartz's misfire
    /// threshold `misfire_ms` and each job running `job_ms`, logging runs
    /// to `log`.
    pub fn start_with(
        jdbc_url: &str,
        name: &str,
        misfire_ms: u64,
        job_ms: u64,
        log: &Path,
    ) -> Scheduler {
        Scheduler::start_as(jdbc_url, name, "lab-1", misfire_ms, job_ms, log)
    }

    /// The same, as scheduler instance `instance` of the cluster.
    pub fn start_as(
        jdbc_url: &str,
        name: &str,
        instance: &str,
        misfire_ms: u64,
        job_ms: u64,
        log: &Path,
    ) -> Scheduler {
        let mut child = Command::new("java")
            .arg("-cp")
            .arg(classpath())
            .arg("QuartzLab")
            .arg("run")
            .arg(format!("url={jdbc_url}"))
            .arg(format!("scheduler={name}"))
            .arg(format!("instance={instance}"))
            .arg(format!("misfire-threshold={misfire_ms}"))
            .arg(format!("job-ms={job_ms}"))
            .arg(format!("log={}", log.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start java (openjdk-17-jdk-headless; scripts/setup installs it)");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut s = Scheduler {
            child,
            stdin,
            stdout,
            log: log.to_owned(),
        };
        let hello = s.read();
        assert!(
            hello.starts_with("ok started"),
            "Quartz did not start: {hello}"
        );
        s
    }

    fn read(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the Quartz lab exited");
        line.trim_end().to_owned()
    }

    /// Sends one command and returns the answer after "ok".
    #[track_caller]
    pub fn cmd(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let answer = self.read();
        match answer.strip_prefix("ok") {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("Quartz lab: {command}: {answer}"),
        }
    }

    /// The run log so far (a job may be mid-line: its run shows later).
    pub fn runs_so_far(&self) -> Vec<Run> {
        runs(&self.log)
    }

    /// Kills the scheduler with SIGKILL, as a host or container dies: no
    /// shutdown, its running jobs stop mid-run and its rows stay as they
    /// were. The run log so far.
    pub fn kill(mut self) -> Vec<Run> {
        self.child.kill().expect("SIGKILL the Quartz lab");
        self.child.wait().unwrap();
        runs(&self.log)
    }

    /// Shuts the scheduler down, waiting for running jobs: the run log is
    /// complete afterwards.
    pub fn stop(mut self) -> Vec<Run> {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
        runs(&self.log)
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
