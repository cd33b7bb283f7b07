//! [`SharedPackages`]: where cluster mode keeps finished export packages, so that the next
//! holder of the engines serves a package the previous one wrote.
//!
//! A single node has none: `{data_dir}/exports/{id}.zip` is the only copy, as it always was.
//! In cluster mode the implementation is the shared PostgreSQL database
//! (`crate::store::PostgresExports`), and each node's `exports/` directory caches it: an export
//! stores its package there before the job is recorded as SUCCESSFUL, and a node asked for a
//! package it does not have fetches it first. Implementations stream: memory does not depend
//! on the package size.

use std::path::Path;

use futures_util::future::BoxFuture;

/// The cluster's copy of finished export packages.
pub trait SharedPackages: Send + Sync + std::fmt::Debug {
    /// Stores the package file of export `id` durably before returning (its SHA-256 computed
    /// while it is read). Idempotent: a package already stored under `id` is kept.
    fn persist<'a>(&'a self, id: &'a str, file: &'a Path) -> BoxFuture<'a, Result<(), String>>;

    /// Writes the package of export `id` to `dest` (a new file), checking it against the
    /// SHA-256 and size it was stored with; `Ok(false)` when none is stored. On `Err` `dest`
    /// may hold a partial file: the caller removes it.
    fn fetch<'a>(&'a self, id: &'a str, dest: &'a Path) -> BoxFuture<'a, Result<bool, String>>;
}
