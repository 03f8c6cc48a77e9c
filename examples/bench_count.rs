//! Benchmark floor: bare librdkafka consumers that read every partition of
//! a topic to its end and count the messages, nothing else.
//!
//!   bench_count BOOTSTRAP TOPIC [parallel]
//!
//! One consumer for all partitions, or with `parallel` one per partition
//! (as `reentry` reads them).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

fn count(bootstrap: &str, topic: &str, partitions: &[i32]) -> u64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-count")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100") // as reentry sets it
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let (mut n, mut eof) = (0u64, 0);
    while eof < partitions.len() {
        match c.poll(Duration::from_secs(30)) {
            Some(Ok(_)) => n += 1,
            Some(Err(KafkaError::PartitionEOF(_))) => eof += 1,
            Some(Err(e)) => panic!("{e}"),
            None => panic!("no answer for 30 s"),
        }
    }
    // Closed as reentry closes its consumers: rust-rdkafka's drop polls
    // 100 ms at a time until the close is served, which no floor should pay.
    c.close_queue().unwrap();
    while !c.closed() {
        c.poll(Duration::from_millis(1));
    }
    n
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (bootstrap, topic) = (a[1].as_str(), a[2].as_str());
    let parallel = a.get(3).is_some_and(|x| x == "parallel");
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let md = probe
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let n: u64 = if parallel {
        std::thread::scope(|s| {
            let hs: Vec<_> = parts
                .iter()
                .map(|p| s.spawn(move || count(bootstrap, topic, &[*p])))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        })
    } else {
        count(bootstrap, topic, &parts)
    };
    println!("{n}");
}
