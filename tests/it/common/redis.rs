//! Redis as the tests see it: through `redis-cli`, an independent client
//! (what reentry says it deleted is checked in Redis's own answers), and
//! servers of a test's own for the tests that kill them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::pg::free_port;
use super::services::address;

/// The shared 3-primary cluster `scripts/services` starts: its nodes.
pub fn cluster_nodes() -> Vec<String> {
    address("REENTRY_TEST_REDIS_CLUSTER", "the Redis cluster")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// Runs `commands` (one per line) through `redis-cli` against `addr`
/// (`-c` for a cluster: it follows MOVED); every answer, one per line.
pub fn cli(addr: &str, cluster: bool, commands: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", host, "-p", port]);
    if cluster {
        cmd.arg("-c");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-cli");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "redis-cli: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The keys under `prefix`, sorted: on every primary of a cluster.
pub fn keys(nodes: &[String], prefix: &str) -> Vec<String> {
    let mut all: Vec<String> = nodes
        .iter()
        .flat_map(|n| {
            let (host, port) = n.rsplit_once(':').unwrap();
            let out = Command::new("redis-cli")
                .args(["-h", host, "-p", port, "--scan", "--pattern"])
                .arg(format!("{prefix}*"))
                .output()
                .unwrap();
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    all.sort();
    all
}

/// A Redis server of the test's own, killed when the test ends. With
/// `appendfsync always`, a SIGKILL loses nothing: restarted, it holds
/// what it held.
pub struct OwnRedis {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start(dir: &Path, args: &[&str]) -> OwnRedis {
        std::fs::create_dir_all(dir).unwrap();
        // A cluster node's bus listens 10000 higher: 55535 at most.
        let port = loop {
            let p = free_port();
            if !args.contains(&"--cluster-enabled") || p <= 55535 {
                break p;
            }
        };
        let mut r = OwnRedis {
            port,
            dir: dir.to_owned(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
        };
        r.restart();
        r
    }

    /// A server that speaks only TLS, on its port, with a self-signed
    /// certificate made by `openssl` for 127.0.0.1 (returned: the CA file).
    pub fn start_tls(dir: &Path) -> (OwnRedis, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut r = OwnRedis {
            port,
            dir: dir.to_owned(),
            args: [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-ca-cert-file",
                cert.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            child: None,
        };
        r.restart();
        (r, cert)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again), on the same port and files.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(self.addr()).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and waits until the port is closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(self.addr()).is_ok() {
                assert!(Instant::now() < deadline, "redis-server did not die");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-primary Redis Cluster of the test's own.
pub struct OwnCluster {
    pub nodes: Vec<OwnRedis>,
}

impl OwnCluster {
    pub fn start(dir: &Path) -> OwnCluster {
        let nodes: Vec<OwnRedis> = (0..3)
            .map(|i| {
                let d = dir.join(format!("node-{i}"));
                let conf = d.join("nodes.conf");
                std::fs::create_dir_all(&d).unwrap();
                OwnRedis::start(
                    &d,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        conf.to_str().unwrap(),
                    ],
                )
            })
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(OwnRedis::addr))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !nodes
            .iter()
            .all(|n| cli(&n.addr(), false, "CLUSTER INFO\n").contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        OwnCluster { nodes }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(OwnRedis::addr).collect()
    }
}
