//! [`SharedFirmware`]: where cluster mode keeps the firmware of record, so that any node can
//! serve a download and no node's disk is the only copy of a package.
//!
//! A single node has none: its blob directory is the only copy (as it always was). In cluster
//! mode the implementation is the shared PostgreSQL database
//! (`crate::store::PostgresFirmware`), and each node's blob directory is a cache of it:
//!
//! - an upload is staged in the receiving node's blob directory as on one node, then
//!   [`persist`](SharedFirmware::persist)ed before its metadata commits, so no metadata ever
//!   names bytes that are not durable where every node can read them;
//! - a download on a node that lacks the file [`fetch`](SharedFirmware::fetch)es it into that
//!   node's cache (the repository checks the SHA-256 before installing it);
//! - deleting a package [`release`](SharedFirmware::release)s its bytes, which the
//!   implementation removes only when no package refers to them any more.
//!
//! The repository never learns which backend holds the bytes; it only sees this trait.
//! Memory must not depend on the package size: implementations stream.

use std::path::Path;

use futures_util::future::BoxFuture;

use super::blob::{BlobError, BlobWriter};

/// The cluster's copy of firmware packages and their metadata of record.
pub trait SharedFirmware: Send + Sync + std::fmt::Debug {
    /// Stores the `size` bytes of `file` under `sha256`, durably, before returning. Idempotent:
    /// bytes already stored under `sha256` are kept (same address, same content).
    fn persist<'a>(
        &'a self,
        sha256: &'a str,
        size: u64,
        file: &'a Path,
    ) -> BoxFuture<'a, Result<(), BlobError>>;

    /// Streams the bytes stored under `sha256` into `into` (which computes their digests and
    /// refuses more bytes than expected). [`BlobError::Missing`] when none are stored.
    fn fetch<'a>(
        &'a self,
        sha256: &'a str,
        into: &'a mut BlobWriter,
    ) -> BoxFuture<'a, Result<(), BlobError>>;

    /// Removes the bytes stored under `sha256` unless a package of record still refers to
    /// them; `true` when they were removed.
    fn release<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<bool, BlobError>>;

    /// The metadata document of record of package `firmware_id` (the JSON body of its
    /// `ota.firmware` document), `None` when there is no such package. Nodes that do not run
    /// the engines have no up-to-date index of packages; a download asks here instead.
    fn package<'a>(
        &'a self,
        firmware_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BlobError>>;
}
