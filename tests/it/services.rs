//! The servers `scripts/test` starts are real and reachable, and the names
//! the harness hands out keep tests apart.

use crate::common::services::{create_topic, kcat, redis_prefix, topic, Redis, Reply};

#[test]
fn redis_keeps_values_under_a_test_prefix() {
    let mut redis = Redis::connect();
    let (a, b) = (redis_prefix("redis-test"), redis_prefix("redis-test"));
    assert_ne!(a, b);
    let key = format!("{a}case:42");
    assert_eq!(
        redis.cmd(&[b"SET", key.as_bytes(), b"v1"]),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        redis.cmd(&[b"GET", key.as_bytes()]),
        Reply::Bulk(Some(b"v1".to_vec()))
    );
    let other = format!("{b}case:42");
    assert_eq!(redis.cmd(&[b"GET", other.as_bytes()]), Reply::Bulk(None));
    assert_eq!(redis.cmd(&[b"DEL", key.as_bytes()]), Reply::Integer(1));
}

#[test]
fn kafka_broker_round_trips_keyed_messages_through_kcat() {
    let topic = topic("kcat-round-trip");
    create_topic(&topic, 3);
    let produce = kcat()
        .args(["-P", "-t", &topic, "-K", ":"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"case-1:opened\ncase-2:closed\n")?;
            child.wait()
        })
        .expect("run kcat (installed by scripts/setup)");
    assert!(produce.success(), "kcat could not produce to {topic}");

    let consumed = kcat()
        .args([
            "-C",
            "-t",
            &topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%k=%s\n",
        ])
        .output()
        .unwrap();
    assert!(
        consumed.status.success(),
        "{}",
        String::from_utf8_lossy(&consumed.stderr)
    );
    let mut got: Vec<String> = String::from_utf8_lossy(&consumed.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    got.sort();
    assert_eq!(got, ["case-1=opened", "case-2=closed"]);
}
