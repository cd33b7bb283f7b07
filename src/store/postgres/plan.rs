//! Ops → statements: what one transaction sends to PostgreSQL.
//!
//! The hot path is a drain of thousands of connection events and version reports. One statement
//! per op would cost a server round of parse/bind/execute each; instead, ops of the *batchable*
//! kinds ([`Op::SetConnection`], [`Op::SetVersion`], [`Op::PutDoc`],
//! [`Op::PutDeviceProperties`]) that follow each other are
//! gathered and sent as ONE multi-row statement per kind (`unnest` of column arrays). Every
//! other op is a statement of its own and ends the gathering, so order is kept wherever it
//! matters.
//!
//! Why gathering across kinds keeps the meaning of applying the ops in order, as long as the
//! whole group commits (a failure is replayed op by op, see the parent module):
//! - the kinds write disjoint things (`devices.last_seen_ms`/`client_ip`, `device_versions`,
//!   `documents` of other kinds, `documents` of kind [`DEVICE_PROPERTIES`](crate::store::DEVICE_PROPERTIES)) and none creates or
//!   deletes a row another one depends on (a connection event on a missing device is a no-op, a
//!   version report needs its device and a properties document is written only while its
//!   device exists, which only [`Op::PutDevice`]/[`Op::DeleteDevice`] change, and those end the
//!   group);
//! - within a kind every op overwrites every column it writes, so of several ops on one row the
//!   last one is the result. Only that one is sent: `ON CONFLICT DO UPDATE` (and `UPDATE …
//!   FROM`) cannot touch one row twice in a statement. Properties documents are merged rather
//!   than overwritten ([`merged_body`]): several writes of one document become their merge,
//!   which is what writing them in order leaves.
//!
//! Rows are sent sorted by key, so two nodes writing overlapping rows lock them in the same
//! order. Pure: tested without a database.

use crate::store::device_properties::merged_body;
use crate::store::{DeviceRecord, InstanceRecord, Op, ProductRecord, SessionWrite, StoreError};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// One statement.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step<'a> {
    Single(Single<'a>),
    /// `SetConnection` rows: one `UPDATE devices … FROM unnest(…)`, each row applied only if
    /// its session is not older than what the row has seen (see [`Session`]).
    Connections {
        product_key: Vec<&'a str>,
        device_name: Vec<&'a str>,
        last_seen_ms: Vec<i64>,
        client_ip: Vec<Option<&'a str>>,
        epoch: Vec<i64>,
        online: Vec<bool>,
        node: Vec<i16>,
    },
    /// `SetVersion` rows: one `INSERT INTO device_versions … SELECT * FROM unnest(…) ON CONFLICT`.
    Versions {
        product_key: Vec<&'a str>,
        device_name: Vec<&'a str>,
        module: Vec<&'a str>,
        version: Vec<&'a str>,
        reported_at_ms: Vec<i64>,
    },
    /// `PutDoc` rows: one `INSERT INTO documents … SELECT * FROM unnest(…) ON CONFLICT`.
    Docs {
        kind: Vec<&'a str>,
        id: Vec<&'a str>,
        body: Vec<&'a str>,
    },
    /// `PutDeviceProperties` rows, merged with the stored documents (see the parent module's
    /// `put_device_properties`): only rows whose device exists (its row locked against a
    /// concurrent delete, so the delete's own removal of the document runs after this write
    /// commits).
    DeviceProperties {
        product_key: Vec<&'a str>,
        device_name: Vec<&'a str>,
        body: Vec<Cow<'a, str>>,
    },
}

/// An op sent as a statement of its own.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Single<'a> {
    PutInstance(&'a InstanceRecord),
    DeleteInstance(&'a str),
    PutProduct(&'a ProductRecord),
    DeleteProduct(&'a str),
    /// With its tags as the JSON text stored in `devices.tags`.
    PutDevice(&'a DeviceRecord, String),
    DeleteDevice(&'a str, &'a str),
    /// The device's [`DEVICE_PROPERTIES`](crate::store::DEVICE_PROPERTIES) document; sent right after its `DeleteDevice`.
    DeleteDeviceProperties(&'a str, &'a str),
    DeleteDoc(&'a str, &'a str),
    /// `(node, before_ms, at_ms)`.
    ReleaseNode(i16, i64, i64),
    /// `(node, seq)`.
    FeedMark(i16, i64),
    /// `(lease, node, epoch)`: fails the submission unless the lease is held so.
    Fence(&'a str, i16, i64),
}

/// A connection event's session: its epoch (`i64` as stored) and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Session {
    epoch: i64,
    online: bool,
}

/// The batchable ops seen since the last single statement, last write per row.
#[derive(Default)]
struct Group<'a> {
    connections: BTreeMap<(&'a str, &'a str), (i64, Option<&'a str>, Session)>,
    versions: BTreeMap<(&'a str, &'a str, &'a str), (&'a str, i64)>,
    docs: BTreeMap<(&'a str, &'a str), &'a str>,
    device_properties: BTreeMap<(&'a str, &'a str), Cow<'a, str>>,
}

impl<'a> Group<'a> {
    /// Appends the group's statements (connections, versions, documents) and empties it.
    fn flush_into(&mut self, steps: &mut Vec<Step<'a>>) {
        let connections = std::mem::take(&mut self.connections);
        if !connections.is_empty() {
            let n = connections.len();
            let (mut product_key, mut device_name) = (Vec::with_capacity(n), Vec::with_capacity(n));
            let (mut last_seen_ms, mut client_ip) = (Vec::with_capacity(n), Vec::with_capacity(n));
            let (mut epoch, mut online, mut node) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for ((pk, dn), (seen, ip, session)) in connections {
                product_key.push(pk);
                device_name.push(dn);
                last_seen_ms.push(seen);
                client_ip.push(ip);
                epoch.push(session.epoch);
                online.push(session.online);
                node.push(crate::cluster::epoch::node_of(session.epoch as u64) as i16);
            }
            steps.push(Step::Connections {
                product_key,
                device_name,
                last_seen_ms,
                client_ip,
                epoch,
                online,
                node,
            });
        }
        let versions = std::mem::take(&mut self.versions);
        if !versions.is_empty() {
            let n = versions.len();
            let (mut product_key, mut device_name) = (Vec::with_capacity(n), Vec::with_capacity(n));
            let (mut module, mut version) = (Vec::with_capacity(n), Vec::with_capacity(n));
            let mut reported_at_ms = Vec::with_capacity(n);
            for ((pk, dn, m), (v, at)) in versions {
                product_key.push(pk);
                device_name.push(dn);
                module.push(m);
                version.push(v);
                reported_at_ms.push(at);
            }
            steps.push(Step::Versions {
                product_key,
                device_name,
                module,
                version,
                reported_at_ms,
            });
        }
        let docs = std::mem::take(&mut self.docs);
        if !docs.is_empty() {
            let n = docs.len();
            let (mut kind, mut id, mut body) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for ((k, i), b) in docs {
                kind.push(k);
                id.push(i);
                body.push(b);
            }
            steps.push(Step::Docs { kind, id, body });
        }
        let device_properties = std::mem::take(&mut self.device_properties);
        if !device_properties.is_empty() {
            let n = device_properties.len();
            let (mut product_key, mut device_name, mut body) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for ((pk, dn), b) in device_properties {
                product_key.push(pk);
                device_name.push(dn);
                body.push(b);
            }
            steps.push(Step::DeviceProperties {
                product_key,
                device_name,
                body,
            });
        }
    }
}

/// The statements that apply `ops` in order (see the module docs for the grouping).
pub(super) fn plan<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Result<Vec<Step<'a>>, StoreError> {
    let mut steps = Vec::new();
    let mut group = Group::default();
    for op in ops {
        let single = match op {
            Op::SetConnection {
                product_key,
                device_name,
                last_seen_ms,
                client_ip,
                session,
            } => {
                // Of several events of one device in a group only the last is sent; the
                // statement's condition makes that equal to applying them in order (an
                // online-then-offline pair of one session becomes "offline, and seen").
                let session = match *session {
                    SessionWrite::Online(e) => Session {
                        epoch: e as i64,
                        online: true,
                    },
                    SessionWrite::Offline(e) => Session {
                        epoch: e as i64,
                        online: false,
                    },
                };
                group.connections.insert(
                    (product_key, device_name),
                    (*last_seen_ms, client_ip.as_deref(), session),
                );
                continue;
            }
            Op::SetVersion {
                product_key,
                device_name,
                module,
                version,
                reported_at_ms,
            } => {
                group.versions.insert(
                    (product_key, device_name, module),
                    (version, *reported_at_ms),
                );
                continue;
            }
            Op::PutDoc { kind, id, body } => {
                group.docs.insert((kind, id), body);
                continue;
            }
            Op::PutDeviceProperties {
                product_key,
                device_name,
                body,
            } => {
                let body = match group.device_properties.remove(&(product_key, device_name)) {
                    Some(earlier) => Cow::Owned(merged_body(&earlier, body)),
                    None => Cow::Borrowed(body.as_str()),
                };
                group
                    .device_properties
                    .insert((product_key, device_name), body);
                continue;
            }
            Op::PutInstance(i) => Single::PutInstance(i),
            Op::DeleteInstance { instance_id } => Single::DeleteInstance(instance_id),
            Op::PutProduct(p) => Single::PutProduct(p),
            Op::DeleteProduct { product_key } => Single::DeleteProduct(product_key),
            Op::PutDevice(d) => {
                let tags = serde_json::to_string(&d.tags).map_err(|e| StoreError::Corrupt {
                    what: "device tags",
                    message: e.to_string(),
                })?;
                Single::PutDevice(d, tags)
            }
            Op::DeleteDevice {
                product_key,
                device_name,
            } => {
                group.flush_into(&mut steps);
                // The device's row first: a concurrent properties write (another node) that
                // locked it has committed when the document's delete runs, and one that comes
                // later finds no device (see `Step::DeviceProperties`).
                steps.push(Step::Single(Single::DeleteDevice(product_key, device_name)));
                Single::DeleteDeviceProperties(product_key, device_name)
            }
            Op::DeleteDoc { kind, id } => Single::DeleteDoc(kind, id),
            Op::ReleaseNode {
                node,
                before_ms,
                at_ms,
            } => Single::ReleaseNode(*node as i16, *before_ms, *at_ms),
            Op::FeedMark { node, seq } => Single::FeedMark(*node as i16, *seq as i64),
            Op::Fence { lease, node, epoch } => Single::Fence(lease, *node as i16, *epoch as i64),
        };
        group.flush_into(&mut steps);
        steps.push(Step::Single(single));
    }
    group.flush_into(&mut steps);
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{device, version};

    fn connection(dn: &str, seen: i64) -> Op {
        Op::SetConnection {
            product_key: "pk".into(),
            device_name: dn.into(),
            last_seen_ms: seen,
            client_ip: (seen % 2 == 0).then(|| format!("10.0.0.{seen}")),
            session: if seen % 2 == 0 {
                SessionWrite::Online(((seen as u64) << 21) | 3)
            } else {
                SessionWrite::Offline(((seen as u64) << 21) | 3)
            },
        }
    }

    fn doc(id: &str, body: &str) -> Op {
        Op::PutDoc {
            kind: "ota.task",
            id: id.into(),
            body: body.into(),
        }
    }

    fn properties(dn: &str, body: &str) -> Op {
        Op::PutDeviceProperties {
            product_key: "pk".into(),
            device_name: dn.into(),
            body: body.into(),
        }
    }

    #[test]
    fn interleaved_reports_become_one_statement_per_kind_with_the_last_write_per_row() {
        let ops = vec![
            connection("b", 1),
            version("pk", "b", "MCU", "1"),
            connection("a", 2),
            doc("t1", "{}"),
            version("pk", "a", "MCU", "1"),
            version("pk", "b", "MCU", "2"),
            connection("b", 3),
            doc("t1", "{\"n\":1}"),
            properties("b", "{\"n\":1}"),
            version("pk", "a", "default", "9"),
            properties("a", "{}"),
            properties("b", "{\"n\":2}"),
        ];
        let steps = plan(&ops).unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Connections {
                    product_key: vec!["pk", "pk"],
                    device_name: vec!["a", "b"],
                    last_seen_ms: vec![2, 3],
                    client_ip: vec![Some("10.0.0.2"), None],
                    epoch: vec![(2 << 21) | 3, (3 << 21) | 3],
                    online: vec![true, false],
                    node: vec![3, 3],
                },
                Step::Versions {
                    product_key: vec!["pk", "pk", "pk"],
                    device_name: vec!["a", "a", "b"],
                    module: vec!["MCU", "default", "MCU"],
                    version: vec!["1", "9", "2"],
                    reported_at_ms: vec![4, 4, 4],
                },
                Step::Docs {
                    kind: vec!["ota.task"],
                    id: vec!["t1"],
                    body: vec!["{\"n\":1}"],
                },
                Step::DeviceProperties {
                    product_key: vec!["pk", "pk"],
                    device_name: vec!["a", "b"],
                    body: vec![Cow::from("{}"), Cow::from("{\"n\":2}")],
                },
            ]
        );
    }

    #[test]
    fn other_ops_keep_their_place_and_split_the_groups() {
        let delete = Op::DeleteDevice {
            product_key: "pk".into(),
            device_name: "a".into(),
        };
        let put = Op::PutDevice(device("pk", "a"));
        let ops = vec![
            version("pk", "a", "MCU", "1"),
            delete.clone(),
            version("pk", "a", "MCU", "2"),
            put.clone(),
            put.clone(),
            Op::DeleteDoc {
                kind: "ota.task",
                id: "t1".into(),
            },
            doc("t1", "{}"),
            Op::DeleteInstance {
                instance_id: "iot-gone".into(),
            },
        ];
        let steps = plan(&ops).unwrap();
        let versions = |v: &'static str| Step::Versions {
            product_key: vec!["pk"],
            device_name: vec!["a"],
            module: vec!["MCU"],
            version: vec![v],
            reported_at_ms: vec![4],
        };
        let device = device("pk", "a");
        let put_device = || Step::Single(Single::PutDevice(&device, "{\"floor\":\"3\"}".into()));
        assert_eq!(
            steps,
            vec![
                versions("1"),
                Step::Single(Single::DeleteDevice("pk", "a")),
                Step::Single(Single::DeleteDeviceProperties("pk", "a")),
                versions("2"),
                put_device(),
                put_device(),
                Step::Single(Single::DeleteDoc("ota.task", "t1")),
                Step::Docs {
                    kind: vec!["ota.task"],
                    id: vec!["t1"],
                    body: vec!["{}"],
                },
                Step::Single(Single::DeleteInstance("iot-gone")),
            ]
        );
        assert!(plan(&[]).unwrap().is_empty());
    }
}
