//! The format of one file in the WAL archive: a 64-byte header that records
//! the compression, the original length and the checksum of the original
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
//!
//! An encrypted object (crypt.rs) has a 128-byte header, format version 2:
//! the compressed payload is then encrypted with age, and the header also
//! records the key id of its recipients and the length and SHA-256 of the
//! payload as stored, so that it can be checked without the private key.
//!
//! ```text
//!  0..56  as in version 1, version byte 2, byte 10 the encryption (1: age-x25519)
//! 56..64  key id of the recipients
//! 64..72  stored payload length, u64 little-endian
//! 72..104 SHA-256 of the stored payload
//! 104..124 zero
//! 124..128 first 4 bytes of SHA-256 over bytes 0..124
//! ```
//!
//! Format version 3 is either layout with a BLAKE3 checksum in place of
//! SHA-256 (byte 11: 1 SHA-256, 2 BLAKE3; byte 10: 0 plain, 1 age-x25519,
//! which makes the header 128 bytes). Where SHA-256 is chosen, versions 1
//! and 2 are still written, so older builds read it. The header's own guard
//! stays SHA-256 in every version.
//!
//! Every earlier version stays readable.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypt::{CryptError, Identities, KeyId, Recipients};

pub const MAGIC: &[u8; 8] = b"RNTRYWAL";
pub const HEADER_LEN: usize = 64;
pub const SEALED_HEADER_LEN: usize = 128;
const FORMAT_VERSION: u8 = 1;
const SEALED_VERSION: u8 = 2;
/// Either layout, with the checksum algorithm in byte 11.
const ALGORITHM_VERSION: u8 = 3;
const CHUNK: usize = 1 << 20;
/// The most a header's length reserves ahead of reading: an object is
/// read whole anyway, and a larger claim is checked against what is there.
const PREALLOC: u64 = 64 << 20;

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

/// The algorithm of a stored checksum. BLAKE3 by default: one 16 MiB
/// segment hashes in about 3 ms with AVX-512, 6 with AVX2 and 13 with SSE2
/// alone, where SHA-256 takes 13 ms with SHA extensions and 67 without.
/// SHA-256 is there for sites that must use a FIPS-approved hash.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sha256,
    #[default]
    Blake3,
}

impl Algorithm {
    fn code(self) -> u8 {
        match self {
            Algorithm::Sha256 => 1,
            Algorithm::Blake3 => 2,
        }
    }

    fn from_code(c: u8) -> Option<Algorithm> {
        match c {
            1 => Some(Algorithm::Sha256),
            2 => Some(Algorithm::Blake3),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3 => "blake3",
        })
    }
}

/// A checksum and its algorithm, shown as `blake3:` or `sha256:` and
/// lower-case hex, as OCI digests are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: Algorithm,
    pub bytes: [u8; 32],
}

impl Checksum {
    /// `bytes` under `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Checksum {
        let mut h = Hasher::new(algorithm);
        h.update(bytes);
        h.finalize()
    }

    /// `algorithm:hex`, or bare hex, which earlier builds wrote for SHA-256.
    pub fn parse(s: &str) -> Option<Checksum> {
        let (algorithm, hex) = match s.split_once(':') {
            Some(("sha256", hex)) => (Algorithm::Sha256, hex),
            Some(("blake3", hex)) => (Algorithm::Blake3, hex),
            Some(_) => return None,
            None => (Algorithm::Sha256, s),
        };
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Checksum { algorithm, bytes })
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.algorithm)?;
        self.bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Checksum::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "not a checksum: {s:?} (want blake3:HEX or sha256:HEX)"
            ))
        })
    }
}

/// A running checksum of either algorithm; as a `Write`, of what is
/// written to it.
pub enum Hasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    pub fn finalize(self) -> Checksum {
        match self {
            Hasher::Sha256(h) => Checksum {
                algorithm: Algorithm::Sha256,
                bytes: h.finalize().into(),
            },
            Hasher::Blake3(h) => Checksum {
                algorithm: Algorithm::Blake3,
                bytes: *h.finalize().as_bytes(),
            },
        }
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub compression: Compression,
    pub raw_len: u64,
    pub checksum: Checksum,
    /// How the payload is encrypted; none in format 1.
    pub sealed: Option<Sealed>,
}

/// An encrypted payload, as its header records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: KeyId,
    pub payload_len: u64,
    /// Under the same algorithm as the content's.
    pub payload_checksum: Checksum,
}

impl Header {
    pub fn header_len(&self) -> usize {
        if self.sealed.is_some() {
            SEALED_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.header_len()];
        b[0..8].copy_from_slice(MAGIC);
        let algorithm = self.checksum.algorithm;
        b[8] = match (algorithm, &self.sealed) {
            (Algorithm::Sha256, None) => FORMAT_VERSION,
            (Algorithm::Sha256, Some(_)) => SEALED_VERSION,
            (Algorithm::Blake3, _) => {
                b[11] = algorithm.code();
                ALGORITHM_VERSION
            }
        };
        b[9] = match self.compression {
            Compression::None => 0,
            Compression::Zstd => 1,
        };
        b[16..24].copy_from_slice(&self.raw_len.to_le_bytes());
        b[24..56].copy_from_slice(&self.checksum.bytes);
        match &self.sealed {
            None => {
                let guard = Sha256::digest(&b[0..56]);
                b[56..60].copy_from_slice(&guard[0..4]);
            }
            Some(s) => {
                b[10] = 1;
                b[56..64].copy_from_slice(&s.key_id.0);
                b[64..72].copy_from_slice(&s.payload_len.to_le_bytes());
                b[72..104].copy_from_slice(&s.payload_checksum.bytes);
                let guard = Sha256::digest(&b[0..124]);
                b[124..128].copy_from_slice(&guard[0..4]);
            }
        }
        b
    }

    /// How long the header that starts with `first` (its first 64 bytes) is.
    fn len_from(first: &[u8]) -> usize {
        match first[8] {
            SEALED_VERSION => SEALED_HEADER_LEN,
            ALGORITHM_VERSION if first[10] != 0 => SEALED_HEADER_LEN,
            _ => HEADER_LEN,
        }
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
        let (algorithm, is_sealed) = match b[8] {
            FORMAT_VERSION => (Algorithm::Sha256, false),
            SEALED_VERSION => (Algorithm::Sha256, true),
            ALGORITHM_VERSION => match Algorithm::from_code(b[11]) {
                Some(a) => (a, b[10] != 0),
                None => return Err(format!("unknown checksum algorithm code {}", b[11])),
            },
            v => {
                return Err(format!(
                    "archive format {v} is newer than this reentry understands"
                ))
            }
        };
        let checksum = |at: std::ops::Range<usize>| Checksum {
            algorithm,
            bytes: b[at].try_into().unwrap(),
        };
        let sealed = if !is_sealed {
            if Sha256::digest(&b[0..56])[0..4] != b[56..60] {
                return Err("its header fails its checksum".into());
            }
            None
        } else {
            if b.len() < SEALED_HEADER_LEN {
                return Err(format!(
                    "only {} bytes, shorter than the {SEALED_HEADER_LEN}-byte header of an encrypted file",
                    b.len()
                ));
            }
            if Sha256::digest(&b[0..124])[0..4] != b[124..128] {
                return Err("its header fails its checksum".into());
            }
            if b[10] != 1 {
                return Err(format!("unknown encryption code {}", b[10]));
            }
            Some(Sealed {
                key_id: KeyId(b[56..64].try_into().unwrap()),
                payload_len: u64::from_le_bytes(b[64..72].try_into().unwrap()),
                payload_checksum: checksum(72..104),
            })
        };
        let compression = match b[9] {
            0 => Compression::None,
            1 => Compression::Zstd,
            other => return Err(format!("unknown compression code {other}")),
        };
        Ok(Header {
            compression,
            raw_len: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            checksum: checksum(24..56),
            sealed,
        })
    }
}

/// How a file is to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Form {
    pub compression: Compression,
    /// The zstd level, when compressed.
    pub level: i32,
    pub checksum: Algorithm,
}

/// `first` and then the rest of `src` in the stored format, in memory:
/// the header, which holds the checksum of everything, is filled in last
/// without a second write. Returns the stored bytes and their header.
pub fn encode(first: &[u8], src: &mut impl Read, form: Form) -> io::Result<(Vec<u8>, Header)> {
    encode_sealed(first, src, form, None)
}

/// `encode`, then, with `to`, the payload encrypted to those recipients.
pub fn encode_sealed(
    first: &[u8],
    src: &mut impl Read,
    form: Form,
    to: Option<&Recipients>,
) -> io::Result<(Vec<u8>, Header)> {
    let (plain, header) = encode_plain(first, src, form)?;
    let Some(to) = to else {
        return Ok((plain, header));
    };
    let payload = to.encrypt(&plain[HEADER_LEN..]);
    let header = Header {
        sealed: Some(Sealed {
            key_id: to.key_id(),
            payload_len: payload.len() as u64,
            payload_checksum: Checksum::of(form.checksum, &payload),
        }),
        ..header
    };
    let mut body = header.encode();
    body.extend_from_slice(&payload);
    Ok((body, header))
}

fn encode_plain(first: &[u8], src: &mut impl Read, form: Form) -> io::Result<(Vec<u8>, Header)> {
    let mut hasher = Hasher::new(form.checksum);
    let mut body = Vec::with_capacity(first.len() + HEADER_LEN);
    body.extend_from_slice(&[0u8; HEADER_LEN]);
    let raw_len = match form.compression {
        // Read straight into the object, without a buffer between (a
        // File's read_to_end reserves its whole size at once), then hash
        // it in one pass: a profile of a push showed the copies and page
        // faults of building it chunk by chunk at a third of its time.
        Compression::None => {
            body.extend_from_slice(first);
            src.read_to_end(&mut body)?;
            hasher.update(&body[HEADER_LEN..]);
            (body.len() - HEADER_LEN) as u64
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(&mut body, form.level)?;
            let n = pump(first, src, &mut enc, &mut hasher)?;
            enc.finish()?;
            n
        }
    };
    let header = Header {
        compression: form.compression,
        raw_len,
        checksum: hasher.finalize(),
        sealed: None,
    };
    body[..HEADER_LEN].copy_from_slice(&header.encode());
    Ok((body, header))
}

fn pump(
    first: &[u8],
    src: &mut impl Read,
    sink: &mut impl Write,
    hasher: &mut Hasher,
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
    /// It is encrypted, and no identity given can decrypt it.
    Key(CryptError),
}

/// Streams the original bytes of a stored file into `sink`, verifying length
/// and checksum. The sink may have received bytes when this fails, so write
/// to a temporary file and publish it only on `Ok`.
pub fn read(src: impl Read, sink: &mut impl Write) -> Result<Header, ReadError> {
    read_with(src, sink, None)
}

/// The header of a stored file, and the reader positioned after it.
fn read_header<R: Read>(src: R) -> Result<(Header, BufReader<R>), ReadError> {
    let mut file = BufReader::with_capacity(CHUNK, src);
    let mut head = [0u8; SEALED_HEADER_LEN];
    let got = read_full(&mut file, &mut head[..HEADER_LEN]).map_err(ReadError::Io)?;
    let mut len = got;
    if got == HEADER_LEN && Header::len_from(&head) == SEALED_HEADER_LEN {
        len += read_full(&mut file, &mut head[HEADER_LEN..]).map_err(ReadError::Io)?;
    }
    let header = Header::decode(&head[..len]).map_err(ReadError::Corrupt)?;
    Ok((header, file))
}

/// The encrypted payload after the header, checked against the length and
/// checksum the header records.
fn sealed_payload(file: &mut impl Read, sealed: &Sealed) -> Result<Vec<u8>, ReadError> {
    // The header's length sizes the buffer only up to PREALLOC: a header
    // that lies is reported as damage below, never an allocation.
    let mut payload = Vec::with_capacity(sealed.payload_len.min(PREALLOC) as usize);
    file.take(sealed.payload_len + 1)
        .read_to_end(&mut payload)
        .map_err(ReadError::Io)?;
    if payload.len() as u64 != sealed.payload_len {
        return Err(ReadError::Corrupt(format!(
            "its encrypted payload is {} bytes, the header records {}",
            payload.len(),
            sealed.payload_len
        )));
    }
    let actual = Checksum::of(sealed.payload_checksum.algorithm, &payload);
    if actual != sealed.payload_checksum {
        return Err(ReadError::Corrupt(format!(
            "its encrypted payload has checksum {actual}, the header records {}",
            sealed.payload_checksum
        )));
    }
    Ok(payload)
}

/// Checks a stored file as far as it can without a key: an encrypted one
/// against its payload's recorded length and checksum, any other one
/// completely.
pub fn check(src: impl Read) -> Result<Header, ReadError> {
    let (header, mut file) = read_header(src)?;
    match &header.sealed {
        Some(sealed) => {
            sealed_payload(&mut file, sealed)?;
            Ok(header)
        }
        None => read_with(
            io::Cursor::new(header.encode()).chain(file),
            &mut io::sink(),
            None,
        ),
    }
}

/// `read`, decrypting with `keys` what is encrypted.
pub fn read_with(
    src: impl Read,
    sink: &mut impl Write,
    keys: Option<&Identities>,
) -> Result<Header, ReadError> {
    let (header, mut file) = read_header(src)?;
    if let Some(sealed) = &header.sealed {
        let payload = sealed_payload(&mut file, sealed)?;
        let keys = keys.ok_or_else(|| {
            ReadError::Key(CryptError::NeedIdentity {
                what: "it".into(),
                key_id: sealed.key_id,
            })
        })?;
        let plain = keys
            .decrypt(&payload, "it", sealed.key_id)
            .map_err(|e| match e {
                CryptError::Damaged { why, .. } => {
                    ReadError::Corrupt(format!("its encrypted payload cannot be decrypted: {why}"))
                }
                e => ReadError::Key(e),
            })?;
        let mut plain_file = Header {
            sealed: None,
            ..header
        }
        .encode();
        plain_file.extend_from_slice(&plain);
        return read_with(plain_file.as_slice(), sink, None).map(|_| header);
    }

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
    let mut hasher = Hasher::new(header.checksum.algorithm);
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
    let actual = hasher.finalize();
    if actual != header.checksum {
        return Err(ReadError::Corrupt(format!(
            "its content has checksum {actual}, the header records {}",
            header.checksum
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

    fn form(compression: Compression, checksum: Algorithm) -> Form {
        Form {
            compression,
            level: 3,
            checksum,
        }
    }

    fn store(data: &[u8], c: Compression) -> File {
        let f = tempfile::tempfile().unwrap();
        let (bytes, _) = encode(&data[..10], &mut &data[10..], form(c, Algorithm::Blake3)).unwrap();
        f.write_all_at(&bytes, 0).unwrap();
        f
    }

    fn identity_file(dir: &std::path::Path, key: &age::x25519::Identity) -> std::path::PathBuf {
        use age::secrecy::ExposeSecret;
        let p = dir.join("key.txt");
        std::fs::write(&p, format!("{}\n", key.to_string().expose_secret())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
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
            assert_eq!(h.checksum.bytes, *blake3::hash(&data).as_bytes());
        }
    }

    /// Each algorithm, plain and encrypted, in the format version it is
    /// written in; a flipped content byte is caught under each, with the
    /// stored algorithm named; and `check` verifies without the key.
    #[test]
    fn every_format_version_round_trips_and_is_checked_by_its_own_algorithm() {
        let data = sample();
        let key = age::x25519::Identity::generate();
        let to = Recipients::parse(&[key.to_public().to_string()], "test").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let keys = Identities::from_file(&identity_file(dir.path(), &key)).unwrap();
        for (algorithm, sealed, version, len) in [
            (Algorithm::Sha256, false, FORMAT_VERSION, HEADER_LEN),
            (Algorithm::Sha256, true, SEALED_VERSION, SEALED_HEADER_LEN),
            (Algorithm::Blake3, false, ALGORITHM_VERSION, HEADER_LEN),
            (
                Algorithm::Blake3,
                true,
                ALGORITHM_VERSION,
                SEALED_HEADER_LEN,
            ),
        ] {
            let what = format!("{algorithm}, sealed {sealed}");
            let to = sealed.then_some(&to);
            let f = form(Compression::None, algorithm);
            let (bytes, h) = encode_sealed(&[], &mut data.as_slice(), f, to).unwrap();
            assert_eq!((bytes[8], h.header_len()), (version, len), "{what}");
            assert_eq!(h.checksum, Checksum::of(algorithm, &data), "{what}");
            assert_eq!(Header::decode(&bytes).unwrap(), h, "{what}");
            assert_eq!(check(bytes.as_slice()).unwrap(), h, "{what}");
            let mut out = Vec::new();
            read_with(bytes.as_slice(), &mut out, Some(&keys)).unwrap();
            assert_eq!(out, data, "{what}");

            let mut bad = bytes.clone();
            let at = bad.len() - 50;
            bad[at] ^= 1;
            match check(bad.as_slice()) {
                Err(ReadError::Corrupt(why)) => {
                    assert!(why.contains(&format!("{algorithm}:")), "{what}: {why}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn checksums_show_and_parse_with_their_algorithm_and_bare_hex_is_sha256() {
        let b = Checksum::of(Algorithm::Blake3, b"abc");
        assert!(b.to_string().starts_with("blake3:6437b3ac"), "{b}");
        assert_eq!(Checksum::parse(&b.to_string()), Some(b));
        let s = Checksum::of(Algorithm::Sha256, b"abc");
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(s.to_string(), format!("sha256:{hex}"));
        assert_eq!(Checksum::parse(hex), Some(s));
        for bad in ["md5:00", "blake3:zz", &hex[1..], "blake3:é"] {
            assert_eq!(Checksum::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_unknown_algorithm_or_a_newer_format_is_named() {
        let f = form(Compression::None, Algorithm::Blake3);
        let (mut bytes, _) = encode(b"x", &mut io::empty(), f).unwrap();
        bytes[11] = 9;
        let guard = Sha256::digest(&bytes[0..56]);
        bytes[56..60].copy_from_slice(&guard[0..4]);
        assert!(Header::decode(&bytes)
            .unwrap_err()
            .contains("algorithm code 9"));
        bytes[8] = 4;
        assert!(Header::decode(&bytes)
            .unwrap_err()
            .contains("format 4 is newer"));
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
