//! Redis over TLS as managed offerings run it (ElastiCache with in-transit
//! encryption, Azure Cache, a self-run `tls-port`): Debian's redis-server
//! with TLS only (`port 0`), clients required to show a certificate, a CA
//! made here with openssl. Counted with `redis-cli --tls`.

use std::path::PathBuf;
use std::process::{Child, Command, Output};

use crate::common::pg::free_port;
use crate::common::tls::{ca, cert, chmod};
use crate::common::{reentry_bin, stderr, stdout};

struct TlsRedis {
    port: u16,
    dir: PathBuf,
    server: Child,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::Builder::new()
            .prefix("reentry-redis-tls-")
            .tempdir()
            .unwrap()
            .keep();
        ca(&dir, "ca");
        cert(&dir, "server", "ca", "localhost", Some("DNS:localhost"));
        cert(&dir, "client", "ca", "reentry", None);
        for k in ["ca.key", "server.key", "client.key"] {
            chmod(&dir.join(k), 0o600);
        }
        let port = free_port();
        let server = Command::new("redis-server")
            .current_dir(&dir)
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes"])
            .args(["--save", "", "--appendonly", "no", "--logfile", "redis.log"])
            .spawn()
            .expect("run redis-server");
        let r = TlsRedis { port, dir, server };
        for _ in 0..100 {
            if r.cli(&["PING"]).status.success() {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "redis-server with TLS did not answer: {}",
            std::fs::read_to_string(r.dir.join("redis.log")).unwrap_or_default()
        );
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// redis-cli over TLS with the client certificate: Redis's own record.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new("redis-cli")
            .args(["--tls", "-h", "localhost", "-p", &self.port.to_string()])
            .args(["--cacert", &self.file("ca.crt")])
            .args([
                "--cert",
                &self.file("client.crt"),
                "--key",
                &self.file("client.key"),
            ])
            .args(args)
            .output()
            .unwrap()
    }

    fn dbsize(&self) -> i64 {
        String::from_utf8_lossy(&self.cli(&["DBSIZE"]).stdout)
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn invalidate(url: &str, tls: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(reentry_bin());
    cmd.args([
        "--json",
        "cache",
        "invalidate",
        "--url",
        url,
        "--pattern",
        "case:*",
        "--apply",
    ]);
    for (flag, value) in tls {
        cmd.arg(flag).arg(value);
    }
    cmd.output().unwrap()
}

#[test]
fn keys_are_unlinked_over_tls_with_a_client_certificate_and_refused_without_one() {
    let r = TlsRedis::start();
    for i in 0..50 {
        assert!(r.cli(&["SET", &format!("case:{i}"), "x"]).status.success());
    }
    assert!(r.cli(&["SET", "other", "x"]).status.success());
    let url = format!("rediss://localhost:{}", r.port);
    let (ca, crt, key) = (r.file("ca.crt"), r.file("client.crt"), r.file("client.key"));

    // No client certificate: the server refuses, and nothing changes.
    let out = invalidate(&url, &[("--tls-ca", &ca)]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&url),
        "names the server: {}",
        stderr(&out)
    );
    assert_eq!(r.dbsize(), 51);
    // An address the certificate does not name: refused.
    let by_address = format!("rediss://127.0.0.1:{}", r.port);
    let out = invalidate(
        &by_address,
        &[
            ("--tls-ca", &ca),
            ("--tls-certificate", &crt),
            ("--tls-key", &key),
        ],
    );
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(r.dbsize(), 51);

    let out = invalidate(
        &url,
        &[
            ("--tls-ca", &ca),
            ("--tls-certificate", &crt),
            ("--tls-key", &key),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(r.dbsize(), 1, "the 50 case keys are gone, `other` is kept");
}
