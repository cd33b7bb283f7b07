//! The engine's store documents: their kinds, their ids and how a value becomes a store op.
//! A leaf: the engine (loading) and the worker (writing) both use it, and it uses neither.

use crate::store::Op;

/// Store document kinds.
pub const TASK_DOC: &str = "migration.task";
pub const DEVICE_DOC: &str = "migration.device";
pub const LOG_DOC: &str = "migration.log";

pub(super) fn parse_doc<T: serde::de::DeserializeOwned>(
    kind: &str,
    id: &str,
    body: &str,
) -> Option<T> {
    match serde_json::from_str(body) {
        Ok(v) => Some(v),
        Err(e) => {
            // One bad document must not keep the gateway from starting; it is logged loudly.
            tracing::error!(kind, id, error = %e, "corrupt migration document skipped");
            None
        }
    }
}

pub(super) fn doc_op<T: serde::Serialize>(kind: &'static str, id: String, value: &T) -> Op {
    Op::PutDoc {
        kind,
        id,
        // Serialising plain structs of strings and numbers cannot fail.
        body: serde_json::to_string(value).unwrap_or_default(),
    }
}

pub(super) fn device_doc_id(task_id: &str, dn: &str) -> String {
    format!("{task_id}/{dn}")
}

pub(super) fn log_doc_id(task_id: &str, seq: u64) -> String {
    format!("{task_id}/{seq:012}")
}
