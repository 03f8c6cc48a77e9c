//! Loads keys for `bench/cache`: `bench_cache_load URL CLUSTER FIRST COUNT PREFIX...`
//! sets `PREFIX:i` for i in FIRST..FIRST+COUNT, taking the prefixes in
//! turn (`bench:match` and `bench:other` give half each). Pipelined; on a
//! cluster through the redis crate's cluster pipeline, routed by slot.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: bench_cache_load URL CLUSTER(0|1) FIRST COUNT PREFIX...");
        std::process::exit(64);
    }
    let (url, cluster) = (&args[0], args[1] == "1");
    let first: u64 = args[2].parse().expect("FIRST");
    let count: u64 = args[3].parse().expect("COUNT");
    let prefixes = &args[4..];
    let key = |i: u64| format!("{}:{i}", prefixes[(i % prefixes.len() as u64) as usize]);
    const CHUNK: u64 = 20_000;
    let mut i = first;
    if cluster {
        let client = redis::cluster::ClusterClient::new(vec![url.as_str()]).expect("cluster URL");
        let mut c = client.get_connection().expect("connect to the cluster");
        while i < first + count {
            let mut p = redis::cluster::cluster_pipe();
            for j in i..(i + CHUNK).min(first + count) {
                p.cmd("SET").arg(key(j)).arg("v").ignore();
            }
            p.query::<()>(&mut c).expect("SET");
            i += CHUNK;
        }
    } else {
        let mut c = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("connect");
        while i < first + count {
            let mut p = redis::pipe();
            for j in i..(i + CHUNK).min(first + count) {
                p.cmd("SET").arg(key(j)).arg("v").ignore();
            }
            p.query::<()>(&mut c).expect("SET");
            i += CHUNK;
        }
    }
}
