//! Search over HTTPS as production runs it: nginx from Debian terminating
//! TLS in front of the OpenSearch node (as in front of a managed domain or
//! a node with the security plugin), asking for basic auth, an API key or
//! a client certificate; a CA made here with openssl. What went is counted
//! on the node itself (`_count`), not through nginx, and nginx's access
//! log shows what reached it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use serde_json::json;

use crate::caches::{apply_cmd, CacheWorld};
use crate::common::pg::free_port;
use crate::common::search::{Indexes, Node};
use crate::common::tls::{ca, cert, chmod};
use crate::common::{assert_exit, stderr, stdout};
use crate::reconcile::ts;

const MIN: i64 = 60_000;
const PASSWORD: &str = "s3cret-search-password";
const KEY: &str = "s3cret-search-api-key";

/// nginx in front of `upstream`, one TLS port per way of logging in.
struct Proxy {
    dir: PathBuf,
    basic: u16,
    api_key: u16,
    client_cert: u16,
    wrong_name: u16,
    nginx: Child,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("reentry-search-tls-")
            .tempdir()
            .unwrap()
            .keep();
        ca(&dir, "ca");
        cert(
            &dir,
            "server",
            "ca",
            "localhost",
            Some("DNS:localhost,IP:127.0.0.1"),
        );
        cert(&dir, "client", "ca", "reentry", None);
        cert(
            &dir,
            "elsewhere",
            "ca",
            "elsewhere.example",
            Some("DNS:elsewhere.example"),
        );
        for k in ["ca.key", "server.key", "client.key", "elsewhere.key"] {
            chmod(&dir.join(k), 0o600);
        }
        let hash = Command::new("openssl")
            .args(["passwd", "-apr1", PASSWORD])
            .output()
            .unwrap();
        assert!(hash.status.success());
        std::fs::write(
            dir.join("htpasswd"),
            format!("reentry:{}", String::from_utf8(hash.stdout).unwrap()),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/');
        let (basic, api_key, client_cert, wrong_name) =
            (free_port(), free_port(), free_port(), free_port());
        let d = dir.display();
        let server = |port: u16, cert: &str, inner: &str| {
            format!(
                "server {{
    listen 127.0.0.1:{port} ssl;
    access_log {d}/access-{port}.log;
    ssl_certificate {d}/{cert}.crt;
    ssl_certificate_key {d}/{cert}.key;
    {inner}
    location / {{
      proxy_pass http://{upstream};
      proxy_set_header Authorization \"\";
    }}
  }}
  "
            )
        };
        let conf = format!(
            "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  client_max_body_size 256m;
  {}{}{}{}
}}
",
            server(
                basic,
                "server",
                &format!("auth_basic \"search\";\n    auth_basic_user_file {d}/htpasswd;"),
            ),
            server(
                api_key,
                "server",
                &format!("if ($http_authorization != \"ApiKey {KEY}\") {{ return 401; }}"),
            ),
            server(
                client_cert,
                "server",
                &format!("ssl_client_certificate {d}/ca.crt;\n    ssl_verify_client on;"),
            ),
            server(wrong_name, "elsewhere", ""),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let nginx = Command::new("nginx")
            .args(["-p", &d.to_string(), "-e", &format!("{d}/error.log")])
            .args(["-c", &format!("{d}/nginx.conf")])
            .spawn()
            .expect("run nginx (Debian's nginx-light, installed by scripts/setup)");
        let p = Proxy {
            dir,
            basic,
            api_key,
            client_cert,
            wrong_name,
            nginx,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", p.wrong_name)).is_ok() {
                return p;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "nginx did not listen: {}",
            std::fs::read_to_string(p.dir.join("error.log")).unwrap_or_default()
        );
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// Requests nginx let through to the node (status 200).
    fn passed(&self, port: u16) -> usize {
        let log = std::fs::read_to_string(self.dir.join(format!("access-{port}.log")))
            .unwrap_or_default();
        log.lines().filter(|l| l.contains("\" 200 ")).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.nginx.kill();
        let _ = self.nginx.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "nginx error log (tail):\n{}",
                std::fs::read_to_string(self.dir.join("error.log"))
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// 5 events before T and 7 after, in an index of their own.
fn events(node: &Node, index: &str, t: i64) {
    node.create(index, None, json!({ "at": { "type": "date" } }));
    let docs: Vec<(String, i64, serde_json::Value)> = (0..5)
        .map(|i| (format!("b{i}"), 1, json!({ "at": ts(t - MIN - i) })))
        .chain((0..7).map(|i| (format!("a{i}"), 1, json!({ "at": ts(t + MIN + i) }))))
        .collect();
    node.put_all(index, &docs);
}

fn dbq(url: &str, index: &str, rest: &str) -> String {
    format!(
        "[[search]]
name = \"events\"
url = \"{url}\"
index = \"{index}\"
strategy = \"delete-by-query\"
timestamp-field = \"at\"
{rest}
"
    )
}

fn apply(w: &CacheWorld, toml: &str, run: &str) -> (Output, PathBuf) {
    let pb = w.playbook(toml);
    let run = w.dir.join(run);
    let out = apply_cmd(&pb, &run, &[])
        .env("SEARCH_PASSWORD", PASSWORD)
        .env("SEARCH_KEY", KEY)
        .output()
        .unwrap();
    (out, run)
}

fn assert_no_secret(out: &Output, run: &Path) {
    // Every file the run wrote (plan, journal, report), whatever its name.
    let mut texts = vec![stdout(out), stderr(out)];
    for e in std::fs::read_dir(run).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            texts.push(String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned());
        }
    }
    assert!(texts.len() > 3, "the run wrote its files");
    for (i, t) in texts.iter().enumerate() {
        for secret in [PASSWORD, KEY] {
            assert!(!t.contains(secret), "text {i} shows a secret: {t}");
        }
        assert!(
            !t.contains("BEGIN PRIVATE KEY"),
            "text {i} shows a key: {t}"
        );
    }
}

#[test]
fn search_over_https_with_basic_auth_trusts_only_the_ca_given_and_refuses_a_wrong_password() {
    let w = CacheWorld::new("search-tls-basic");
    let ix = Indexes::new("search-tls-basic");
    let node = &ix.node;
    let index = ix.name("events");
    events(node, &index, w.t);
    let proxy = Proxy::start(&node.url);
    let url = format!("https://localhost:{}", proxy.basic);
    let login = "username = \"reentry\"\npassword = \"${SEARCH_PASSWORD}\"";

    // The system's trust store does not know the CA: refused, nothing sent.
    let (out, _) = apply(&w, &dbq(&url, &index, login), "no-ca");
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out).to_lowercase();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(node.count_all(&index), 12);
    assert_eq!(proxy.passed(proxy.basic), 0);

    // The right CA, the wrong password: nginx answers 401, named as such.
    let ca = format!("tls-ca = \"{}\"", proxy.path("ca.crt"));
    let wrong = format!("username = \"reentry\"\npassword = \"not-the-password\"\n{ca}");
    let (out, _) = apply(&w, &dbq(&url, &index, &wrong), "wrong-password");
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("HTTP 401"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("not-the-password"));
    assert_eq!(node.count_all(&index), 12);

    // The CA and the password: the events after T go, counted on the node.
    let (out, run) = apply(&w, &dbq(&url, &index, &format!("{login}\n{ca}")), "ok");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let left = node.docs(&index);
    assert_eq!(left.len(), 5, "{left:?}");
    assert!(left.keys().all(|k| k.starts_with('b')), "{left:?}");
    assert!(proxy.passed(proxy.basic) > 0);
    assert_no_secret(&out, &run);

    // A server whose certificate names another host is refused, CA or not.
    let elsewhere = format!("https://localhost:{}", proxy.wrong_name);
    events(node, &ix.name("events2"), w.t);
    let (out, _) = apply(&w, &dbq(&elsewhere, &ix.name("events2"), &ca), "wrong-name");
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).to_lowercase().contains("certificate"),
        "{}",
        stderr(&out)
    );
    assert_eq!(node.count_all(&ix.name("events2")), 12);
}

#[test]
fn search_over_https_with_an_api_key_or_a_client_certificate() {
    let w = CacheWorld::new("search-tls-key");
    let ix = Indexes::new("search-tls-key");
    let node = &ix.node;
    let proxy = Proxy::start(&node.url);
    let ca = format!("tls-ca = \"{}\"", proxy.path("ca.crt"));

    // An API key, sent as Elasticsearch's `ApiKey` scheme.
    let keyed = ix.name("keyed");
    events(node, &keyed, w.t);
    let url = format!("https://localhost:{}", proxy.api_key);
    let (out, run) = apply(
        &w,
        &dbq(
            &url,
            &keyed,
            &format!("api-key = \"${{SEARCH_KEY}}\"\n{ca}"),
        ),
        "api-key",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(node.count_all(&keyed), 5);
    assert_no_secret(&out, &run);

    // A server that requires a client certificate: without one, refused.
    let certified = ix.name("certified");
    events(node, &certified, w.t);
    let url = format!("https://localhost:{}", proxy.client_cert);
    let (out, _) = apply(&w, &dbq(&url, &certified, &ca), "no-client-cert");
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("HTTP 400"), "{}", stderr(&out));
    assert_eq!(node.count_all(&certified), 12);

    // With it, the step runs.
    let with_cert = format!(
        "{ca}\ntls-certificate = \"{}\"\ntls-key = \"{}\"",
        proxy.path("client.crt"),
        proxy.path("client.key")
    );
    let (out, run) = apply(&w, &dbq(&url, &certified, &with_cert), "client-cert");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(node.count_all(&certified), 5);
    assert_no_secret(&out, &run);

    // A certificate without its key is a located error in the playbook.
    let half = format!("{ca}\ntls-certificate = \"{}\"", proxy.path("client.crt"));
    let (out, _) = apply(&w, &dbq(&url, &certified, &half), "half");
    assert_exit(&out, 78);
    let err = stderr(&out);
    assert!(
        err.contains("a client certificate needs its key") && err.contains("tls-certificate = "),
        "{err}"
    );
}
