//! Benchmark floor: a bare librdkafka consumer that reads every partition
//! of a topic to its end and counts the messages, nothing else.
//!
//!   bench_count BOOTSTRAP TOPIC

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (bootstrap, topic) = (&a[1], &a[2]);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-count")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100") // as reentry sets it
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts = md.topics()[0].partitions().len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let (mut n, mut eof) = (0u64, 0);
    while eof < parts {
        match c.poll(Duration::from_secs(30)) {
            Some(Ok(_)) => n += 1,
            Some(Err(KafkaError::PartitionEOF(_))) => eof += 1,
            Some(Err(e)) => panic!("{e}"),
            None => panic!("no answer for 30 s"),
        }
    }
    println!("{n}");
}
