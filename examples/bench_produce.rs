//! Benchmark helper: produces outbox events to a topic, as a relay would.
//!
//!   bench_produce BOOTSTRAP TOPIC RANGES T_MS
//!
//! RANGES is `a-b[,c-d…]` of event numbers; event n has id
//! 00000000-0000-4000-8000-<n, 12 digits> in header `event_id`, key
//! `case-<n mod 10000>`, a JSON payload, and a timestamp spread over the
//! half hour before T_MS.

use reentry::kafka::{Kafka, Outgoing};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (bootstrap, topic, ranges, t_ms) = (&a[1], &a[2], &a[3], a[4].parse::<i64>().unwrap());
    let k = Kafka::new(bootstrap);
    let mut batch = Vec::with_capacity(50_000);
    let mut sent = 0u64;
    for r in ranges.split(',') {
        let (lo, hi) = r.split_once('-').unwrap();
        let (lo, hi): (u64, u64) = (lo.parse().unwrap(), hi.parse().unwrap());
        for n in lo..=hi {
            let id = format!("00000000-0000-4000-8000-{n:012}");
            batch.push(Outgoing {
                key: Some(format!("case-{}", n % 10_000).into_bytes()),
                payload: format!(
                    "{{\"eventId\":\"{id}\",\"type\":\"CaseUpdated\",\"caseId\":{},\"status\":\"open\"}}",
                    n % 10_000
                )
                .into_bytes(),
                headers: vec![("event_id".into(), id.into_bytes())],
                timestamp: Some(t_ms - 1_800_000 + (n as i64 * 1_800_000 / 1_001_000)),
            });
            if batch.len() == batch.capacity() {
                k.produce(topic, &batch).unwrap();
                sent += batch.len() as u64;
                batch.clear();
            }
        }
    }
    k.produce(topic, &batch).unwrap();
    sent += batch.len() as u64;
    println!("{sent}");
}
