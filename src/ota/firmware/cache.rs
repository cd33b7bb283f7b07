//! Cluster mode: this node's blob directory is a cache of the shared firmware, and a package
//! deleted through the engines' holder must not stay in it. [`CacheFollower`] follows the
//! `ota.firmware` documents other nodes write (a [`DocFollower`] of the change feed): it knows
//! every package's bytes (SHA-256) and, when a package is deleted, removes its cached file
//! unless another package of record names the same bytes. After a resynchronisation (the node
//! may have missed deletions) it removes every cached file no package names.
//!
//! A download that fetched a package's bytes just as the package was deleted may install them
//! after the deletion was followed; the file then stays until the next resynchronisation or
//! start (which sweeps files no package names). It is never served: a download reads the
//! package's metadata of record first.

use super::blob::{is_blob_name, remove_blob};
use super::DOC_KIND;
use crate::cluster::DocFollower;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Follows the packages of record for this node's blob cache.
pub struct CacheFollower {
    blob_dir: PathBuf,
    /// Every package of record: id → the SHA-256 of its bytes.
    packages: Mutex<HashMap<String, String>>,
}

impl CacheFollower {
    pub(super) fn new(blob_dir: PathBuf) -> CacheFollower {
        CacheFollower {
            blob_dir,
            packages: Mutex::new(HashMap::new()),
        }
    }

    fn packages(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.packages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes cached files (file system work: off the caller's task, the feed receiver).
    fn remove(&self, which: Removal) {
        if matches!(&which, Removal::These(shas) if shas.is_empty()) {
            return;
        }
        let dir = self.blob_dir.clone();
        let work = move || {
            let shas = match which {
                Removal::These(shas) => shas,
                Removal::Unnamed(named) => unnamed_blobs(&dir, &named),
            };
            for sha in &shas {
                remove_blob(&dir, sha);
                tracing::info!(sha256 = %sha, "cached firmware of a deleted package removed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(work)),
            Err(_) => work(),
        }
    }
}

/// Which cached files to remove.
enum Removal {
    /// These blobs.
    These(Vec<String>),
    /// Every blob not in the set.
    Unnamed(HashSet<String>),
}

/// The part of a package document ([`super::FirmwarePackage`]) the cache needs.
#[derive(serde::Deserialize)]
struct Bytes {
    sha256: String,
}

/// The SHA-256 a package document names (`None`: not a package document).
fn sha256_of(body: &str) -> Option<String> {
    serde_json::from_str::<Bytes>(body).ok().map(|p| p.sha256)
}

/// The cached blobs of `dir` that no package in `named` refers to.
fn unnamed_blobs(dir: &Path, named: &HashSet<String>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_blob_name(name) && !named.contains(name))
        .collect()
}

impl DocFollower for CacheFollower {
    fn kinds(&self) -> Vec<&'static str> {
        vec![DOC_KIND]
    }

    fn changed(&self, kind: &str, id: &str, body: Option<&str>) {
        if kind != DOC_KIND {
            return;
        }
        let gone = {
            let mut packages = self.packages();
            match body {
                Some(body) => {
                    if let Some(sha) = sha256_of(body) {
                        packages.insert(id.to_owned(), sha);
                    }
                    None
                }
                None => packages
                    .remove(id)
                    .filter(|sha| !packages.values().any(|other| other == sha)),
            }
        };
        self.remove(Removal::These(gone.into_iter().collect()));
    }

    fn reloaded(&self, kind: &str, docs: &[(String, String)]) {
        if kind != DOC_KIND {
            return;
        }
        let named: HashMap<String, String> = docs
            .iter()
            .filter_map(|(id, body)| sha256_of(body).map(|sha| (id.clone(), sha)))
            .collect();
        let shas: HashSet<String> = named.values().cloned().collect();
        *self.packages() = named;
        self.remove(Removal::Unnamed(shas));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn doc(id: &str, c: char) -> (String, String) {
        (
            id.to_owned(),
            format!(r#"{{"firmware_id":"{id}","sha256":"{}"}}"#, sha(c)),
        )
    }

    fn cached(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn deleted_packages_leave_the_cache_unless_another_names_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for name in [sha('a'), sha('b'), sha('c'), "upload-1.tmp".to_owned()] {
            std::fs::write(dir.path().join(name), b"bytes").unwrap();
        }
        let follower = CacheFollower::new(dir.path().to_owned());
        assert_eq!(follower.kinds(), vec![DOC_KIND]);
        // fw-1 and fw-2 share their bytes; nothing names `c` (deleted while this node did not
        // hear): gone at the reload. Files that are not blobs (a fetch in progress) stay.
        follower.reloaded(
            DOC_KIND,
            &[doc("fw-1", 'a'), doc("fw-2", 'a'), doc("fw-3", 'b')],
        );
        assert_eq!(
            cached(dir.path()),
            vec![sha('a'), sha('b'), "upload-1.tmp".into()]
        );
        follower.changed(DOC_KIND, "fw-1", None);
        assert_eq!(cached(dir.path()).len(), 3, "fw-2 still names its bytes");
        follower.changed(DOC_KIND, "fw-2", None);
        assert_eq!(cached(dir.path()), vec![sha('b'), "upload-1.tmp".into()]);
        // A package created elsewhere with the same bytes keeps them.
        let (id, body) = doc("fw-4", 'b');
        follower.changed(DOC_KIND, &id, Some(&body));
        follower.changed(DOC_KIND, "fw-3", None);
        assert_eq!(cached(dir.path()), vec![sha('b'), "upload-1.tmp".into()]);
        follower.changed(DOC_KIND, "fw-4", None);
        assert_eq!(cached(dir.path()), vec!["upload-1.tmp".to_owned()]);
        // Other kinds and unknown packages change nothing.
        follower.changed("ota.job", "fw-9", None);
        follower.changed(DOC_KIND, "fw-9", None);
        assert_eq!(cached(dir.path()), vec!["upload-1.tmp".to_owned()]);
    }
}
