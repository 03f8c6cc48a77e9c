//! Kafka as production runs it: a SASL_SSL listener on the test broker
//! (`scripts/services` makes its CA and broker certificate with openssl,
//! and its SCRAM-SHA-512 user with Kafka's own StorageTool), reached by
//! the outbox diff, `kafka offsets-at` and `kafka rewind`. A wrong password
//! and a broker certificate for another name are refused at once, naming
//! the broker and what failed. OAUTHBEARER over the same listener, and an
//! SSL listener that requires a client certificate (reached with an
//! encrypted key and its passphrase). Effects are counted with Kafka's own
//! tools, or against what kcat produced.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::services::{address, kafka_bootstrap};
use crate::common::{assert_exit, reentry_bin, stderr, stdout};
use crate::reconcile::{ts, World};

/// The SASL_SSL listener and its SCRAM-SHA-512 user (also used by
/// `kafka.rs`, whose ACL test refuses this user alone).
pub(crate) struct Scram {
    pub(crate) bootstrap: String,
    pub(crate) ca: String,
    pub(crate) user: String,
    pub(crate) password: String,
}

pub(crate) fn scram() -> Scram {
    Scram {
        bootstrap: address("REENTRY_TEST_KAFKA_SASL_SSL", "Kafka's SASL_SSL listener"),
        ca: address("REENTRY_TEST_KAFKA_CA", "the Kafka test CA"),
        user: address("REENTRY_TEST_KAFKA_SCRAM_USER", "the Kafka SCRAM user"),
        password: address("REENTRY_TEST_KAFKA_SCRAM_PASSWORD", "the Kafka SCRAM user"),
    }
}

/// Runs `cmd`, killed after 60 s: a client that retries forever must fail
/// this test, not hang it.
fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} still ran after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// `reentry kafka ARGS… --json` over SASL_SSL with SCRAM-SHA-512, the
/// password from the environment.
fn kafka(s: &Scram, bootstrap: &str, password: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(reentry_bin());
    cmd.arg("kafka")
        .args(args)
        .args(["--json", "--bootstrap", bootstrap])
        .args([
            "--security-protocol",
            "SASL_SSL",
            "--sasl-mechanism",
            "SCRAM-SHA-512",
        ])
        .args(["--sasl-username", &s.user, "--ssl-ca", &s.ca])
        .env("REENTRY_KAFKA_SASL_PASSWORD", password);
    run_bounded(cmd)
}

#[test]
fn the_outbox_diff_offsets_at_and_a_rewind_work_over_sasl_ssl_with_scram() {
    let s = scram();
    let w = World::new();
    let pb = w.playbook("pb.toml", "provider.csv");
    // The same playbook, its [kafka] on the SASL_SSL listener, the password
    // through ${VAR}.
    let text = std::fs::read_to_string(&pb).unwrap();
    let plain = format!("bootstrap = \"{}\"", kafka_bootstrap());
    assert!(text.contains(&plain));
    let secured = pb.with_file_name("secured.toml");
    std::fs::write(
        &secured,
        text.replace(
            &plain,
            &format!(
                "bootstrap = \"{}\"\nsecurity-protocol = \"SASL_SSL\"\nsasl-mechanism = \"SCRAM-SHA-512\"\n\
                 sasl-username = \"{}\"\nsasl-password = \"${{KAFKA_PASSWORD}}\"\nssl-ca = \"{}\"\n\
                 properties = {{ \"socket.keepalive.enable\" = \"true\" }}",
                s.bootstrap, s.user, s.ca
            ),
        ),
    )
    .unwrap();

    let mut cmd = Command::new(reentry_bin());
    cmd.args(["--json", "outbox", "diff"])
        .arg(&secured)
        .env("KAFKA_PASSWORD", &s.password);
    let out = run_bounded(cmd);
    assert_exit(&out, 1);
    let diff: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let c = &diff[0]["classes"];
    assert_eq!(c["mark-published"], 5, "{c:#}");
    assert_eq!(c["orphans"], 7, "{c:#}");
    assert_eq!(c["mark-unpublished"], 3, "{c:#}");
    assert_eq!(c["scan"]["messages"], 32, "{c:#}");

    // The plan shows the playbook's template, never the password.
    let mut cmd = Command::new(reentry_bin());
    cmd.args(["--json", "plan"])
        .arg(&secured)
        .env("KAFKA_PASSWORD", &s.password);
    let out = run_bounded(cmd);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
    for text in [stdout(&out), stderr(&out)] {
        assert!(
            !text.contains(&s.password),
            "the password was shown: {text}"
        );
    }

    // A verbose dry run: what it prints, logs, journals and reports holds
    // no password either.
    let run = w.dir.join("dry-run");
    let mut cmd = Command::new(reentry_bin());
    cmd.args(["-v", "apply"])
        .arg(&secured)
        .arg("--run-dir")
        .arg(&run)
        .env("KAFKA_PASSWORD", &s.password);
    let out = run_bounded(cmd);
    assert_exit(&out, 0);
    let mut texts = vec![stdout(&out), stderr(&out)];
    for e in std::fs::read_dir(&run).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            texts.push(String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned());
        }
    }
    assert!(texts.len() > 3, "the run wrote its files");
    for text in texts {
        assert!(
            !text.contains(&s.password),
            "the password was shown: {text}"
        );
    }

    let at = ts(w.t);
    let out = kafka(
        &s,
        &s.bootstrap,
        &s.password,
        &["offsets-at", &w.topic, &at],
    );
    assert_exit(&out, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let messages: i64 = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["messages"].as_i64().unwrap())
        .sum();
    assert_eq!(messages, 12, "{v:#}");

    let out = kafka(
        &s,
        &s.bootstrap,
        &s.password,
        &[
            "rewind", &w.group, "--topic", &w.topic, "--to", &at, "--apply",
        ],
    );
    assert_exit(&out, 0);
    // Kafka's own tool, over plaintext: the group now sits at T, 12
    // messages before the end.
    let (text, rows) = crate::kafka::group_tool(&w.group);
    let behind: i64 = rows
        .values()
        .map(|r| r.end - r.current.expect("committed"))
        .sum();
    assert_eq!(behind, 12, "{text}");
}

#[test]
fn a_wrong_password_and_a_certificate_for_another_name_are_refused_at_once() {
    let s = scram();
    let t = ts(crate::reconcile::now_ms());
    let topic = crate::common::services::topic("tls");
    crate::common::services::create_topic(&topic, 1);

    let out = kafka(
        &s,
        &s.bootstrap,
        "not-the-password",
        &["offsets-at", &topic, &t],
    );
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&s.bootstrap)
            && err.contains("SCRAM-SHA-512")
            && err.contains("Authentication failed"),
        "names the broker, the mechanism and the failure: {err}"
    );
    assert!(!err.contains("not-the-password"), "{err}");

    // The broker's certificate names localhost, not 127.0.0.1.
    let by_address = s.bootstrap.replace("localhost", "127.0.0.1");
    let out = kafka(&s, &by_address, &s.password, &["offsets-at", &topic, &t]);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&by_address) && err.contains("certificate verify failed"),
        "names the broker and the failed verification: {err}"
    );
}

/// The SSL listener, which requires a client certificate signed by the
/// test CA; the client key is encrypted.
struct Mtls {
    bootstrap: String,
    ca: String,
    cert: String,
    key: String,
    key_password: String,
}

fn mtls() -> Mtls {
    let what = "Kafka's SSL listener (client certificates required)";
    Mtls {
        bootstrap: address("REENTRY_TEST_KAFKA_SSL", what),
        ca: address("REENTRY_TEST_KAFKA_CA", "the Kafka test CA"),
        cert: address("REENTRY_TEST_KAFKA_CLIENT_CERT", what),
        key: address("REENTRY_TEST_KAFKA_CLIENT_KEY", what),
        key_password: address("REENTRY_TEST_KAFKA_CLIENT_KEY_PASSWORD", what),
    }
}

/// A topic of two partitions holding 5 + 3 messages, produced with kcat
/// over plaintext; and a time before them.
fn eight_messages(test: &str) -> (String, String) {
    let topic = crate::common::services::topic(test);
    crate::common::services::create_topic(&topic, 2);
    let t = ts(crate::reconcile::now_ms() - 60_000);
    for (p, n) in [(0, 5), (1, 3)] {
        let mut child = crate::common::services::kcat()
            .args(["-P", "-t", &topic, "-p", &p.to_string()])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for i in 0..n {
            writeln!(stdin, "event {i}").unwrap();
        }
        drop(stdin);
        assert!(child.wait().unwrap().success());
    }
    (topic, t)
}

fn messages_after(out: &Output) -> i64 {
    let v: serde_json::Value = serde_json::from_str(&stdout(out)).unwrap();
    v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["messages"].as_i64().unwrap())
        .sum()
}

#[test]
fn a_client_certificate_with_an_encrypted_key_reaches_a_broker_that_requires_one() {
    let m = mtls();
    let (topic, t) = eight_messages("mtls");
    let run = |cert: bool, key_password: &str| {
        let mut cmd = Command::new(reentry_bin());
        cmd.args(["kafka", "offsets-at", &topic, &t, "--json"])
            .args(["--bootstrap", &m.bootstrap, "--security-protocol", "SSL"])
            .args(["--ssl-ca", &m.ca]);
        if cert {
            cmd.args(["--ssl-certificate", &m.cert, "--ssl-key", &m.key])
                .env("REENTRY_KAFKA_SSL_KEY_PASSWORD", key_password);
        }
        run_bounded(cmd)
    };

    let out = run(true, &m.key_password);
    assert_exit(&out, 0);
    assert_eq!(messages_after(&out), 8, "{}", stdout(&out));
    assert!(!stdout(&out).contains(&m.key_password) && !stderr(&out).contains(&m.key_password));

    // No client certificate: the broker closes the handshake; reentry says
    // so at once, naming the broker.
    let out = run(false, "");
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&m.bootstrap) && err.contains("give ssl-certificate and ssl-key"),
        "{err}"
    );
    // At the broker's alert, not after waiting out the metadata timeout.
    assert!(!err.contains("no metadata within"), "{err}");

    // The wrong passphrase for the key: refused before connecting, named.
    let out = run(true, "not-the-passphrase");
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("ssl-key: ") && err.contains("ssl-key-password"),
        "{err}"
    );
    assert!(!err.contains("not-the-passphrase"), "{err}");
}

#[test]
fn oauthbearer_reaches_the_broker_over_sasl_ssl() {
    let s = scram();
    let (topic, t) = eight_messages("oauth");
    // librdkafka's unsecured JWT, which Kafka's default OAUTHBEARER
    // validator takes (no identity provider runs here); the token's
    // principal is a secret setting, never shown.
    let mut cmd = Command::new(reentry_bin());
    cmd.args(["kafka", "offsets-at", &topic, &t, "--json"])
        .args([
            "--bootstrap",
            &s.bootstrap,
            "--security-protocol",
            "SASL_SSL",
        ])
        .args(["--sasl-mechanism", "OAUTHBEARER", "--ssl-ca", &s.ca])
        .args([
            "--kafka-property",
            "enable.sasl.oauthbearer.unsecure.jwt=true",
            "--kafka-property",
            "sasl.oauthbearer.config=principal=reentry-oauth-principal",
        ]);
    let out = run_bounded(cmd);
    assert_exit(&out, 0);
    assert_eq!(messages_after(&out), 8, "{}", stdout(&out));
    assert!(!stderr(&out).contains("reentry-oauth-principal"));
}
