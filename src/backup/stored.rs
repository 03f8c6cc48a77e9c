//! The format of one file in the WAL archive: a 64-byte header that records
//! the compression, the original length and the SHA-256 of the original
//! bytes, then the payload. Verification needs nothing but the file itself.
//!
//! ```text
//!  0..8   magic "RNTRYWAL"
//!  8      format version (1)
//!  9      compression: 0 none, 1 zstd
//! 10..16  zero
//! 16..24  original length, u64 little-endian
//! 24..56  SHA-256 of the original bytes
//! 56..60  first 4 bytes of SHA-256 over bytes 0..56 (guards the header)
//! 60..64  zero
//! ```

use std::cell::RefCell;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"RNTRYWAL";
pub const HEADER_LEN: usize = 64;
const FORMAT_VERSION: u8 = 1;
const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        })
    }
}

/// A SHA-256 digest, shown as lower-case hex like `sha256sum`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sha256Sum(pub [u8; 32]);

impl fmt::Display for Sha256Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Sha256Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Sha256Sum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub compression: Compression,
    pub raw_len: u64,
    pub sha256: Sha256Sum,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8] = FORMAT_VERSION;
        b[9] = match self.compression {
            Compression::None => 0,
            Compression::Zstd => 1,
        };
        b[16..24].copy_from_slice(&self.raw_len.to_le_bytes());
        b[24..56].copy_from_slice(&self.sha256.0);
        let guard = Sha256::digest(&b[0..56]);
        b[56..60].copy_from_slice(&guard[0..4]);
        b
    }

    /// Decodes a header; the error says what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err(format!(
                "only {} bytes, shorter than the {HEADER_LEN}-byte header",
                b.len()
            ));
        }
        if &b[0..8] != MAGIC {
            return Err("it does not start with the reentry archive magic".into());
        }
        if Sha256::digest(&b[0..56])[0..4] != b[56..60] {
            return Err("its header fails its checksum".into());
        }
        if b[8] != FORMAT_VERSION {
            return Err(format!(
                "archive format {} is newer than this reentry understands",
                b[8]
            ));
        }
        let compression = match b[9] {
            0 => Compression::None,
            1 => Compression::Zstd,
            other => return Err(format!("unknown compression code {other}")),
        };
        Ok(Header {
            compression,
            raw_len: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            sha256: Sha256Sum(b[24..56].try_into().unwrap()),
        })
    }
}

/// `first` and then the rest of `src` in the stored format, in memory:
/// the header, which holds the checksum of everything, is filled in last
/// without a second write. Returns the stored bytes and their header.
pub fn encode(
    first: &[u8],
    src: &mut impl Read,
    compression: Compression,
    level: i32,
) -> io::Result<(Vec<u8>, Header)> {
    let mut hasher = Sha256::new();
    let mut body = Vec::with_capacity(first.len() + HEADER_LEN);
    body.extend_from_slice(&[0u8; HEADER_LEN]);
    let raw_len = match compression {
        Compression::None => pump(first, src, &mut body, &mut hasher)?,
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(&mut body, level)?;
            let n = pump(first, src, &mut enc, &mut hasher)?;
            enc.finish()?;
            n
        }
    };
    let header = Header {
        compression,
        raw_len,
        sha256: Sha256Sum(hasher.finalize().into()),
    };
    body[..HEADER_LEN].copy_from_slice(&header.encode());
    Ok((body, header))
}

fn pump(
    first: &[u8],
    src: &mut impl Read,
    sink: &mut impl Write,
    hasher: &mut Sha256,
) -> io::Result<u64> {
    let mut raw_len = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut chunk: &[u8] = first;
    loop {
        if !chunk.is_empty() {
            hasher.update(chunk);
            raw_len += chunk.len() as u64;
            sink.write_all(chunk)?;
        }
        let n = read_some(src, &mut buf)?;
        if n == 0 {
            return Ok(raw_len);
        }
        chunk = &buf[..n];
    }
}

fn read_some(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match src.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Why a stored file could not be read back.
#[derive(Debug)]
pub enum ReadError {
    /// The file's bytes are wrong: bad header, truncated, checksum mismatch.
    Corrupt(String),
    /// Reading the stored file or writing to the sink failed.
    Io(io::Error),
}

/// Streams the original bytes of a stored file into `sink`, verifying length
/// and checksum. The sink may have received bytes when this fails, so write
/// to a temporary file and publish it only on `Ok`.
pub fn read(src: impl Read, sink: &mut impl Write) -> Result<Header, ReadError> {
    let mut file = BufReader::with_capacity(CHUNK, src);
    let mut head = [0u8; HEADER_LEN];
    let got = read_full(&mut file, &mut head).map_err(ReadError::Io)?;
    let header = Header::decode(&head[..got]).map_err(ReadError::Corrupt)?;

    // zstd reports a damaged frame and a failing disk the same way; keep the
    // disk's own errors aside so they are not blamed on the file's content.
    let disk_error = Rc::new(RefCell::new(None));
    let tracked = TrackErrors {
        inner: file,
        seen: disk_error.clone(),
    };
    let mut payload: Box<dyn Read> = match header.compression {
        Compression::None => Box::new(tracked),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(CHUNK, tracked))
                .map_err(ReadError::Io)?,
        ),
    };
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match read_some(&mut payload, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                return Err(match disk_error.borrow_mut().take() {
                    Some(disk) => ReadError::Io(disk),
                    None => ReadError::Corrupt(format!(
                        "its {} payload cannot be decoded: {e}",
                        header.compression
                    )),
                })
            }
        };
        if n == 0 {
            break;
        }
        len += n as u64;
        if len > header.raw_len {
            return Err(ReadError::Corrupt(format!(
                "it holds more than the {} bytes its header records",
                header.raw_len
            )));
        }
        hasher.update(&buf[..n]);
        sink.write_all(&buf[..n]).map_err(ReadError::Io)?;
    }
    if len != header.raw_len {
        return Err(ReadError::Corrupt(format!(
            "it is truncated: {len} of {} bytes",
            header.raw_len
        )));
    }
    let actual = Sha256Sum(hasher.finalize().into());
    if actual != header.sha256 {
        return Err(ReadError::Corrupt(format!(
            "its content has sha256 {actual}, the header records {}",
            header.sha256
        )));
    }
    Ok(header)
}

/// Reads until `buf` is full or the end of input; returns how much was read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match read_some(r, &mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

struct TrackErrors<R> {
    inner: R,
    seen: Rc<RefCell<Option<io::Error>>>,
}

impl<R: Read> Read for TrackErrors<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                *self.seen.borrow_mut() = Some(io::Error::new(e.kind(), e.to_string()));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;

    fn store(data: &[u8], c: Compression) -> File {
        let f = tempfile::tempfile().unwrap();
        let (bytes, _) = encode(&data[..10], &mut &data[10..], c, 3).unwrap();
        f.write_all_at(&bytes, 0).unwrap();
        f
    }

    fn reopen(f: &File) -> File {
        let mut f = f.try_clone().unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    fn sample() -> Vec<u8> {
        (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trips_with_and_without_compression() {
        let data = sample();
        for c in [Compression::None, Compression::Zstd] {
            let f = store(&data, c);
            let mut out = Vec::new();
            let h = read(reopen(&f), &mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!((h.compression, h.raw_len), (c, data.len() as u64));
            assert_eq!(h.sha256.0, <[u8; 32]>::from(Sha256::digest(&data)));
        }
    }

    #[test]
    fn detects_a_flipped_byte_and_a_truncation_in_either_compression() {
        let data = sample();
        for c in [Compression::None, Compression::Zstd] {
            let f = store(&data, c);
            let len = f.metadata().unwrap().len();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, len / 2).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], len / 2).unwrap();
            assert!(
                matches!(
                    read(reopen(&f), &mut io::sink()),
                    Err(ReadError::Corrupt(_))
                ),
                "{c}: flip"
            );

            let f = store(&data, c);
            f.set_len(len - 100).unwrap();
            assert!(
                matches!(
                    read(reopen(&f), &mut io::sink()),
                    Err(ReadError::Corrupt(_))
                ),
                "{c}: cut"
            );
        }
    }

    #[test]
    fn a_damaged_header_is_reported_as_such() {
        let f = store(&sample(), Compression::None);
        f.write_all_at(&[0xFF], 20).unwrap();
        match read(reopen(&f), &mut io::sink()) {
            Err(ReadError::Corrupt(why)) => assert!(why.contains("header"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(Header::decode(b"short").unwrap_err().contains("shorter"));
    }
}
