//! The mirror a standby node keeps in cluster mode: the engines' lease holder is the only
//! writer of migration documents, and every other node follows its writes from the change
//! feed (each changed document re-read from the store), so the tasks, device records, logs
//! and data-sync routes it serves are the holder's.
//!
//! Documents arrive one by one, in the holder's commit order; after a resync of the feed a
//! whole kind arrives at once ([`reloaded`]). A device record or log line of a task this node
//! does not know (yet) is dropped: the task document always commits first, and the next
//! reload or term puts everything back from the store.

use super::config::Hooks;
use super::docs::{parse_doc, DEVICE_DOC, LOG_DOC, TASK_DOC};
use super::model::{DeviceDoc, LogEntry, TaskDoc};
use super::shared::{apply_route, remove_route, Shared, State};
use std::collections::HashMap;

/// The document kinds the mirror follows.
pub const KINDS: [&str; 3] = [TASK_DOC, DEVICE_DOC, LOG_DOC];

/// `kind`/`id` is `body` now (`None`: deleted).
pub(super) fn changed(shared: &Shared, hooks: &Hooks, kind: &str, id: &str, body: Option<&str>) {
    match kind {
        TASK_DOC => {
            let doc = body.and_then(|b| parse_doc::<TaskDoc>(TASK_DOC, id, b));
            let old = {
                let mut state = shared.write();
                match &doc {
                    Some(doc) => {
                        state.put_task(doc.clone());
                        None
                    }
                    None => forget_task(&mut state, id),
                }
            };
            match doc {
                Some(doc) => apply_route(shared, hooks, &doc),
                None => {
                    if let Some(old) = old {
                        remove_route(shared, hooks, &old);
                    }
                }
            }
        }
        DEVICE_DOC => {
            let Some((tid, dn)) = id.split_once('/') else {
                return;
            };
            let doc = body.and_then(|b| parse_doc::<DeviceDoc>(DEVICE_DOC, id, b));
            let mut state = shared.write();
            let Some(entry) = state.tasks.get_mut(tid) else {
                return;
            };
            match doc {
                Some(doc) => {
                    entry.devices.insert(dn.to_owned(), doc);
                }
                None => {
                    entry.devices.remove(dn);
                }
            }
        }
        LOG_DOC => {
            let Some((tid, _)) = id.split_once('/') else {
                return;
            };
            let line = body.and_then(|b| parse_doc::<LogEntry>(LOG_DOC, id, b));
            let mut state = shared.write();
            let Some(entry) = state.tasks.get_mut(tid) else {
                return;
            };
            if let Some(line) = line {
                put_log(&mut entry.log, line);
            }
            // Log lines are deleted only with their task.
        }
        _ => {}
    }
}

/// Every document of `kind` now (after a resync of the feed).
pub(super) fn reloaded(shared: &Shared, hooks: &Hooks, kind: &str, docs: &[(String, String)]) {
    match kind {
        TASK_DOC => {
            let docs: HashMap<String, TaskDoc> = docs
                .iter()
                .filter_map(|(id, body)| {
                    parse_doc::<TaskDoc>(TASK_DOC, id, body).map(|d| (d.task_id.clone(), d))
                })
                .collect();
            let gone: Vec<TaskDoc> = {
                let mut state = shared.write();
                let gone: Vec<String> = state
                    .tasks
                    .keys()
                    .filter(|tid| !docs.contains_key(*tid))
                    .cloned()
                    .collect();
                let gone = gone
                    .iter()
                    .filter_map(|tid| forget_task(&mut state, tid))
                    .collect();
                for doc in docs.values() {
                    state.put_task(doc.clone());
                }
                gone
            };
            for doc in &gone {
                remove_route(shared, hooks, doc);
            }
            for doc in docs.values() {
                apply_route(shared, hooks, doc);
            }
        }
        DEVICE_DOC => {
            let mut state = shared.write();
            for entry in state.tasks.values_mut() {
                entry.devices.clear();
            }
            for (id, body) in docs {
                let Some((tid, dn)) = id.split_once('/') else {
                    continue;
                };
                let Some(entry) = state.tasks.get_mut(tid) else {
                    continue;
                };
                if let Some(doc) = parse_doc::<DeviceDoc>(DEVICE_DOC, id, body) {
                    entry.devices.insert(dn.to_owned(), doc);
                }
            }
        }
        LOG_DOC => {
            let mut state = shared.write();
            for entry in state.tasks.values_mut() {
                entry.log.clear();
            }
            for (id, body) in docs {
                let Some((tid, _)) = id.split_once('/') else {
                    continue;
                };
                let Some(entry) = state.tasks.get_mut(tid) else {
                    continue;
                };
                if let Some(line) = parse_doc::<LogEntry>(LOG_DOC, id, body) {
                    put_log(&mut entry.log, line);
                }
            }
        }
        _ => {}
    }
}

/// Removes a task with its records and log; its document, if it was known.
fn forget_task(state: &mut State, task_id: &str) -> Option<TaskDoc> {
    let entry = state.tasks.remove(task_id)?;
    if state
        .by_product
        .get(&entry.doc.product_key)
        .map(String::as_str)
        == Some(task_id)
    {
        state.by_product.remove(&entry.doc.product_key);
    }
    Some(entry.doc)
}

/// Puts a log line in its place (the log is ordered by `seq`; a line seen twice is replaced).
fn put_log(log: &mut Vec<LogEntry>, line: LogEntry) {
    match log.binary_search_by_key(&line.seq, |l| l.seq) {
        Ok(at) => log[at] = line,
        Err(at) => log.insert(at, line),
    }
}
