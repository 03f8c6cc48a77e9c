//! A repository in a local directory: every write goes through a
//! temporary file, fsync, a hard link (create-only) or a rename, and an
//! fsync of the directory (`fsutil`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{check_key, ObjectInfo, Put, Store, StoreError};
use crate::fsutil::{self, TempGuard};

pub struct Local {
    root: PathBuf,
}

impl Local {
    pub fn new(root: impl Into<PathBuf>) -> Local {
        Local { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn err(&self, op: &'static str, key: &str) -> impl FnOnce(io::Error) -> StoreError {
        let (key, store) = (key.to_owned(), self.location());
        move |source| StoreError::Io {
            op,
            key,
            store,
            source,
        }
    }

    /// A complete, fsynced temporary file beside `path` holding `body`.
    fn stage(&self, key: &str, path: &Path, body: &[u8]) -> Result<TempGuard, StoreError> {
        let dir = path.parent().expect("keys are relative to the root");
        fsutil::create_dir_all_durable(dir).map_err(self.err("create the directory of", key))?;
        let tmp = fsutil::temp_path_beside(path);
        let guard = TempGuard(Some(tmp.clone()));
        let mut f = File::create_new(&tmp).map_err(self.err("write", key))?;
        f.write_all(body).map_err(self.err("write", key))?;
        f.sync_all().map_err(self.err("fsync", key))?;
        Ok(guard)
    }
}

impl Store for Local {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match fs::read(self.path(key)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("read", key)(e)),
        }
    }

    fn put_if_absent(&self, key: &str, body: &[u8]) -> Result<Put, StoreError> {
        let path = self.path(key)?;
        let mut guard = self.stage(key, &path, body)?;
        let tmp = guard.0.clone().expect("staged");
        if fsutil::publish_no_replace(&tmp, &path).map_err(self.err("publish", key))? {
            guard.disarm();
            Ok(Put::Created)
        } else {
            Ok(Put::Exists)
        }
    }

    fn put(&self, key: &str, body: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let mut guard = self.stage(key, &path, body)?;
        let tmp = guard.0.clone().expect("staged");
        fs::rename(&tmp, &path).map_err(self.err("publish", key))?;
        guard.disarm();
        let dir = path.parent().expect("keys are relative to the root");
        fsutil::sync_dir(dir).map_err(self.err("fsync the directory of", key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        // Walk from the deepest directory the prefix names in full.
        let start = match prefix.rfind('/') {
            Some(i) => self.root.join(&prefix[..i]),
            None => self.root.clone(),
        };
        let mut out = Vec::new();
        let mut dirs = vec![start];
        while let Some(dir) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err("list", prefix)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(self.err("list", prefix))?;
                let path = entry.path();
                let ft = entry.file_type().map_err(self.err("list", prefix))?;
                if ft.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().into_owned();
                if key.starts_with(prefix) {
                    let meta = entry.metadata().map_err(self.err("list", prefix))?;
                    out.push(ObjectInfo {
                        key,
                        size: meta.len(),
                        modified: meta.modified().ok(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.err("remove", key)(e)),
        }
        let mut dir = path.parent().expect("keys are relative to the root");
        // A file's parts (backup/parts.rs) are kept in directories of their
        // own, `NAME.parts/PUSH/`: those go with their last part.
        let parts_dir = |d: &Path| d.to_string_lossy().ends_with(".parts");
        while parts_dir(dir) || dir.parent().is_some_and(parts_dir) {
            if fs::remove_dir(dir).is_err() {
                break;
            }
            dir = dir.parent().expect("under the root");
        }
        fsutil::sync_dir(dir).map_err(self.err("fsync the directory of", key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_if_absent_never_replaces_and_listing_shows_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = Local::new(dir.path());
        assert_eq!(s.put_if_absent("a/b/one", b"first").unwrap(), Put::Created);
        assert_eq!(s.put_if_absent("a/b/one", b"second").unwrap(), Put::Exists);
        assert_eq!(s.get("a/b/one").unwrap().unwrap(), b"first");
        s.put("a/two", b"x").unwrap();
        s.put("a/two", b"y").unwrap();
        assert_eq!(s.get("a/two").unwrap().unwrap(), b"y");
        let temp = format!("a/b/{}x", fsutil::TEMP_PREFIX);
        fs::write(dir.path().join(&temp), b"").unwrap();
        let keys: Vec<_> = s.list("a/").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(keys, [temp.as_str(), "a/b/one", "a/two"]);
        assert_eq!(s.list("a/b/o").unwrap().len(), 1);
        assert!(s.list("zzz/").unwrap().is_empty());
        s.delete("a/two").unwrap();
        s.delete("a/two").unwrap();
        assert_eq!(s.get("a/two").unwrap(), None);
    }

    #[test]
    fn racing_creators_leave_one_object_and_the_others_learn_it() {
        let dir = tempfile::tempdir().unwrap();
        let created: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8u8)
                .map(|i| {
                    let root = dir.path().to_owned();
                    sc.spawn(move || Local::new(root).put_if_absent("k", &[i; 4096]).unwrap())
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .filter(|p| *p == Put::Created)
                .count()
        });
        assert_eq!(created, 1);
        let s = Local::new(dir.path());
        let body = s.get("k").unwrap().unwrap();
        assert!(body.iter().all(|b| *b == body[0]));
        assert_eq!(s.list("").unwrap().len(), 1, "no temporary file left");
    }
}
