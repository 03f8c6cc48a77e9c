//! An HTTP proxy in front of moto that plays an S3-compatible store's
//! faults: one that ignores `If-None-Match: *` (older MinIO and Ceph RGW,
//! some gateways), or one whose answer to a create is lost after the write
//! (a 503 in place of the 200), so that the client's retry finds its own
//! object. One request per connection (`Connection: close`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `If-None-Match` is dropped from every request.
    IgnoreIfNoneMatch,
    /// The first create (`PUT` with `If-None-Match: *`) of each path that
    /// contains this is forwarded, and its 200 replaced by a 503.
    LoseFirstCreateOf(&'static str),
}

pub struct S3Proxy {
    pub url: String,
    /// Paths whose create was written upstream and answered 503 here.
    pub lost: Arc<Mutex<BTreeSet<String>>>,
}

impl S3Proxy {
    /// A proxy to `upstream` (`http://HOST:PORT`); it runs until the test
    /// process ends.
    pub fn start(upstream: &str, fault: Fault) -> S3Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let lost = Arc::new(Mutex::new(BTreeSet::new()));
        let lost2 = lost.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (upstream, lost) = (upstream.clone(), lost2.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &upstream, fault, &lost);
                });
            }
        });
        S3Proxy { url, lost }
    }
}

fn serve(
    conn: TcpStream,
    upstream: &str,
    fault: Fault,
    lost: &Mutex<BTreeSet<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = Vec::new();
    let mut length = 0usize;
    let mut conditional = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name == "content-length" {
            length = line[15..].trim().parse().unwrap_or(0);
        }
        if name == "if-none-match" {
            conditional = true;
            if fault == Fault::IgnoreIfNoneMatch {
                continue;
            }
        }
        if name == "connection" {
            continue;
        }
        headers.push(line);
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(request_line.as_bytes())?;
    for h in &headers {
        up.write_all(h.as_bytes())?;
    }
    up.write_all(b"Connection: close\r\n\r\n")?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut conn = conn;
    if let Fault::LoseFirstCreateOf(pattern) = fault {
        if method == "PUT"
            && conditional
            && path.contains(pattern)
            // moto answers HTTP/1.0: the status code decides.
            && answer.split(|b| *b == b' ').nth(1) == Some(&b"200"[..])
            && lost.lock().unwrap().insert(path.to_owned())
        {
            conn.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
    }
    conn.write_all(&answer)
}
