//! A WAL file larger than one part (16 MiB of content): the segments of a
//! cluster initialised with `--wal-segsize` above 16, up to 1 GiB.
//!
//! It is stored as parts and a manifest. Each part is a stored file of its
//! own (stored.rs: header, compression, encryption), under
//! `KEY.parts/UNIQUE/NNNN`, where UNIQUE is new for every push. After every
//! part is in place, the manifest is published create-only under KEY, so
//! the file becomes visible whole or not at all, as a single object would.
//! A multipart upload could not be create-only; this can, on any store.
//! Memory stays at one part, whatever the segment size.
//!
//! A push killed before its manifest, or one that lost a race, leaves parts
//! no manifest names. The loser of a race deletes its own; a killed push's
//! are listed as leftovers (`wal verify` names them once they are old) and
//! go when the file is expired.
//!
//! ```text
//! RNTRYPRT\n{"format":1,"raw_len":…,"checksum":"blake3:…","compression":"zstd",
//!            "parts":[{"key":"…/000000010000000000000001.parts/…/0000","raw_len":…,"checksum":"…"}, …]}
//! ```

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::backup::stored::{self, Checksum, Compression, Form, Hasher, Header, ReadError};
use crate::crypt::{Identities, Recipients};
use crate::storage::{Put, Store, StoreError};

/// The content of one part.
pub const PART: usize = 16 << 20;
pub const MAGIC: &[u8; 9] = b"RNTRYPRT\n";
const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The whole file's length and checksum.
    pub raw_len: u64,
    pub checksum: Checksum,
    pub compression: Compression,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub key: String,
    pub raw_len: u64,
    /// As the part's own header records it.
    pub checksum: Checksum,
}

/// Where the parts of the file under `key` are kept.
pub fn prefix(key: &str) -> String {
    format!("{key}.parts/")
}

/// The key whose parts `part_key` is one of, and the push it came from.
pub fn owner(part_key: &str) -> Option<(&str, &str)> {
    let (owner, rest) = part_key.split_once(".parts/")?;
    Some((owner, rest.split('/').next()?))
}

pub fn is_manifest(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(serde_json::to_vec(self).expect("a manifest serializes"));
        b.push(b'\n');
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let json = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or("it is not a manifest of parts")?;
        let m: Manifest =
            serde_json::from_slice(json).map_err(|e| format!("its manifest of parts: {e}"))?;
        if m.format != FORMAT {
            return Err(format!(
                "its manifest of parts is format {}, which this reentry does not read",
                m.format
            ));
        }
        let sum: u64 = m.parts.iter().map(|p| p.raw_len).sum();
        if sum != m.raw_len {
            return Err(format!(
                "its manifest records {} bytes in parts of {sum} bytes",
                m.raw_len
            ));
        }
        Ok(m)
    }

    /// The header a single stored file of this content would have.
    pub fn header(&self) -> Header {
        Header {
            compression: self.compression,
            raw_len: self.raw_len,
            checksum: self.checksum,
            sealed: None,
        }
    }

    /// The push these parts came from (the UNIQUE of their keys).
    pub fn push_id(&self) -> Option<&str> {
        owner(&self.parts.first()?.key).map(|(_, id)| id)
    }
}

/// A name no other push of `key` uses: the time, the process and a count.
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{nanos:x}-{:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum PartsError {
    #[error("cannot read {what}")]
    Read {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} already exists; a part is never written twice")]
    Exists(String),
}

/// Stores `first` and the rest of `src` as parts under `key`'s prefix and
/// returns the manifest that would publish them. Nothing is visible under
/// `key` yet.
pub fn write(
    store: &dyn Store,
    key: &str,
    first: &[u8],
    src: &mut impl Read,
    form: Form,
    to: Option<&Recipients>,
    what: &str,
) -> Result<(Manifest, u64), PartsError> {
    let base = format!("{}{}/", prefix(key), unique());
    let mut whole = Hasher::new(form.checksum);
    let mut parts = Vec::new();
    let mut stored_len = 0u64;
    let mut buf = Vec::with_capacity(PART);
    buf.extend_from_slice(first);
    loop {
        let have = buf.len();
        buf.resize(PART, 0);
        let got = stored::read_full(src, &mut buf[have..]).map_err(|source| PartsError::Read {
            what: what.to_owned(),
            source,
        })?;
        buf.truncate(have + got);
        if buf.is_empty() {
            break;
        }
        whole.update(&buf);
        let (body, header) =
            stored::encode_sealed(&buf, &mut io::empty(), form, to).map_err(|source| {
                PartsError::Read {
                    what: what.to_owned(),
                    source,
                }
            })?;
        let part_key = format!("{base}{:04}", parts.len());
        if store.put_new_or_same(&part_key, &body)? == Put::Exists {
            return Err(PartsError::Exists(format!(
                "{}/{part_key}",
                store.location()
            )));
        }
        stored_len += body.len() as u64;
        parts.push(Part {
            key: part_key,
            raw_len: header.raw_len,
            checksum: header.checksum,
        });
        let full = buf.len() == PART;
        buf.clear();
        if !full {
            break;
        }
    }
    let manifest = Manifest {
        format: FORMAT,
        raw_len: parts.iter().map(|p| p.raw_len).sum(),
        checksum: whole.finalize(),
        compression: form.compression,
        parts,
    };
    Ok((manifest, stored_len))
}

/// Removes every part under `key`'s prefix: the file is being removed.
pub fn remove(store: &dyn Store, key: &str) -> Result<(), StoreError> {
    for o in store.list(&prefix(key))? {
        store.delete(&o.key)?;
    }
    Ok(())
}

/// Removes the parts of one push of `key`.
pub fn remove_push(store: &dyn Store, key: &str, id: &str) -> Result<(), StoreError> {
    for o in store.list(&format!("{}{id}/", prefix(key)))? {
        store.delete(&o.key)?;
    }
    Ok(())
}

fn part_bytes(store: &dyn Store, p: &Part) -> Result<Vec<u8>, ReadError> {
    match store.get(&p.key) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(ReadError::Corrupt(format!("its part {} is missing", p.key))),
        Err(e) => Err(ReadError::Io(io::Error::other(e.to_string()))),
    }
}

fn part_matches(p: &Part, h: &Header) -> Result<(), ReadError> {
    if h.checksum != p.checksum || h.raw_len != p.raw_len {
        return Err(ReadError::Corrupt(format!(
            "its part {} holds {} bytes with checksum {}; the manifest records {} bytes with checksum {}",
            p.key, h.raw_len, h.checksum, p.raw_len, p.checksum
        )));
    }
    Ok(())
}

fn in_part(p: &Part, e: ReadError) -> ReadError {
    match e {
        ReadError::Corrupt(d) => ReadError::Corrupt(format!("its part {}: {d}", p.key)),
        e => e,
    }
}

/// Streams the whole file into `sink`, each part verified against its own
/// header and the manifest, and the whole against the manifest's length
/// and checksum. As with `stored::read`, the sink may have received bytes
/// when this fails.
pub fn read(
    store: &dyn Store,
    m: &Manifest,
    sink: &mut impl Write,
    keys: Option<&Identities>,
) -> Result<Header, ReadError> {
    let mut tee = Tee {
        sink,
        hasher: Hasher::new(m.checksum.algorithm),
        len: 0,
    };
    for p in &m.parts {
        let bytes = part_bytes(store, p)?;
        let h = stored::read_with(bytes.as_slice(), &mut tee, keys).map_err(|e| in_part(p, e))?;
        part_matches(p, &h)?;
    }
    let actual = tee.hasher.finalize();
    if tee.len != m.raw_len || actual != m.checksum {
        return Err(ReadError::Corrupt(format!(
            "its parts join to {} bytes with checksum {actual}; the manifest records {} bytes with checksum {}",
            tee.len, m.raw_len, m.checksum
        )));
    }
    Ok(m.header())
}

/// Checks every part as far as it can without a key (stored::check) and
/// against the manifest.
pub fn check(store: &dyn Store, m: &Manifest) -> Result<Header, ReadError> {
    for p in &m.parts {
        let bytes = part_bytes(store, p)?;
        let h = stored::check(bytes.as_slice()).map_err(|e| in_part(p, e))?;
        part_matches(p, &h)?;
    }
    Ok(m.header())
}

struct Tee<'a, W> {
    sink: &'a mut W,
    hasher: Hasher,
    len: u64,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sink.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::stored::Algorithm;
    use crate::storage::Local;

    fn form() -> Form {
        Form {
            compression: Compression::Zstd,
            level: 1,
            checksum: Algorithm::Blake3,
        }
    }

    /// 40 MiB: two full parts and one of 8 MiB.
    fn content() -> Vec<u8> {
        (0..40u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect()
    }

    #[test]
    fn a_large_file_goes_in_parts_that_read_back_whole_and_a_damaged_part_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Local::new(dir.path());
        let data = content();
        let (m, _) = write(
            &store,
            "archive/x",
            &data[..100],
            &mut &data[100..],
            form(),
            None,
            "x",
        )
        .unwrap();
        assert_eq!(
            m.parts.iter().map(|p| p.raw_len).collect::<Vec<_>>(),
            [16 << 20, 16 << 20, 8 << 20]
        );
        assert_eq!(m.checksum, Checksum::of(Algorithm::Blake3, &data));
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert!(is_manifest(&m.encode()));
        let mut out = Vec::new();
        read(&store, &m, &mut out, None).unwrap();
        assert!(out == data);
        check(&store, &m).unwrap();

        // Parts swapped: each is intact, the manifest catches the order.
        let mut swapped = m.clone();
        swapped.parts.swap(0, 1);
        let why = match read(&store, &swapped, &mut io::sink(), None) {
            Err(ReadError::Corrupt(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(why.contains("the manifest records"), "{why}");

        store.delete(&m.parts[1].key).unwrap();
        match check(&store, &m) {
            Err(ReadError::Corrupt(why)) => {
                assert!(
                    why.contains(&m.parts[1].key) && why.contains("missing"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }

        remove_push(&store, "archive/x", "other").unwrap();
        assert_eq!(store.list("archive/x.parts/").unwrap().len(), 2);
        remove(&store, "archive/x").unwrap();
        assert!(store.list("archive/x.parts/").unwrap().is_empty());
        assert!(
            !dir.path().join("archive/x.parts").exists(),
            "its directories go too"
        );
    }

    #[test]
    fn a_manifest_whose_parts_do_not_add_up_is_refused() {
        let m = Manifest {
            format: FORMAT,
            raw_len: 10,
            checksum: Checksum::of(Algorithm::Blake3, b""),
            compression: Compression::None,
            parts: vec![],
        };
        let why = Manifest::decode(&m.encode()).unwrap_err();
        assert!(why.contains("10 bytes in parts of 0"), "{why}");
        assert_eq!(
            owner("archive/0000000100000000/000000010000000000000001.parts/abc-1-0/0003"),
            Some((
                "archive/0000000100000000/000000010000000000000001",
                "abc-1-0"
            ))
        );
    }
}
