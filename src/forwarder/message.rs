//! What the forwarder sends: one [`ForwardMessage`] per device event, already in the vendor's
//! server-side subscription format (Alibaba IoT "AMQP server-side subscription"), so consumer
//! applications written for the vendor keep working.
//!
//! | kind | `topic` header | body |
//! |---|---|---|
//! | property post | `/{pk}/{dn}/thing/event/property/post` | `{iotId, requestId, productKey, deviceName, gmtCreate, deviceType, items:{Prop:{value,time}}}` |
//! | event post | `/{pk}/{dn}/thing/event/{identifier}/post` | `{identifier, name, type, value:{…}, time, iotId, productKey, deviceName, requestId, gmtCreate}` |
//! | online/offline | `/as/mqtt/status/{pk}/{dn}` | `{status, iotId, productKey, deviceName, time, utcTime, lastTime, utcLastTime, clientIp}` |
//! | device's answer to a property set / service call | `/{pk}/{dn}/thing/downlink/reply/message` | `{gmtCreate, iotId, productKey, deviceName, requestId, code, message, topic, data}` (`topic`: the request's) |
//! | OTA task state | `/{pk}/{dn}/ota/task/state` (fleetgate's own; the vendor pushes OTA state on a region topic) | `{iotId, productKey, deviceName, jobId, firmwareId, moduleName, destVersion, fromStatus, status, event, desc, step, attempt, gmtCreate}` |
//!
//! The AMQP-level envelope (message id, headers, delivery mode) is added by the publisher from
//! the outbox row, see `publisher::properties`.

use crate::ota::TaskEvent;
use fleetgate_topics::{EventPostRequest, PropertyPostRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// What a forwarded message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    PropertyPost,
    EventPost,
    Status,
    OtaTaskState,
    DownlinkReply,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::PropertyPost => "property_post",
            MessageKind::EventPost => "event_post",
            MessageKind::Status => "status",
            MessageKind::OtaTaskState => "ota_task_state",
            MessageKind::DownlinkReply => "downlink_reply",
        }
    }

    pub fn parse(s: &str) -> Option<MessageKind> {
        Some(match s {
            "property_post" => MessageKind::PropertyPost,
            "event_post" => MessageKind::EventPost,
            "status" => MessageKind::Status,
            "ota_task_state" => MessageKind::OtaTaskState,
            "downlink_reply" => MessageKind::DownlinkReply,
            _ => return None,
        })
    }
}

/// One message to forward: the device it is about, the vendor `topic` header, when it was
/// generated and its JSON body. Routing (which instances receive it) and the AMQP message id are
/// decided at [`enqueue`](super::Forwarder::enqueue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardMessage {
    pub kind: MessageKind,
    pub product_key: String,
    pub device_name: String,
    /// The vendor `topic` application header.
    pub topic: String,
    /// Milliseconds since the Unix epoch (`generateTime` header).
    pub generate_time_ms: i64,
    /// JSON body.
    pub body: Vec<u8>,
}

/// A stable, opaque device id derived from `(product_key, device_name)` (the vendor's `iotId`
/// is an opaque 20-character string too): the same device always gets the same id.
pub fn iot_id(product_key: &str, device_name: &str) -> String {
    let digest = Sha256::digest(format!("{product_key}&{device_name}").as_bytes());
    hex::encode(&digest[..10])
}

/// An OTA task state change, as the forwarder sends it (built from the OTA engine's
/// [`TaskEvent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OtaTaskStateChange {
    pub job_id: String,
    pub firmware_id: String,
    /// Firmware module (`default` when the device named none).
    pub module: String,
    pub dest_version: String,
    /// The state before (`CONFIRM`, `QUEUED`, `NOTIFIED`, `IN_PROGRESS`, …).
    pub from_status: String,
    /// The state now.
    pub status: String,
    /// What happened (`pushed`, `failed`, `retry_scheduled`, …).
    pub event: String,
    /// Failure or queue reason, or free text.
    pub reason: Option<String>,
    /// Last progress percent the device reported.
    pub progress: Option<u8>,
    pub attempt: u32,
}

impl From<&TaskEvent> for OtaTaskStateChange {
    fn from(e: &TaskEvent) -> Self {
        let coded =
            |v: serde_json::Result<Value>| v.ok().and_then(|v| v.as_str().map(str::to_owned));
        let reason = e
            .failure
            .map(|f| coded(serde_json::to_value(f)))
            .or_else(|| e.queue_reason.map(|q| coded(serde_json::to_value(q))))
            .flatten()
            .or_else(|| e.reason.clone());
        OtaTaskStateChange {
            job_id: e.job_id.clone(),
            firmware_id: e.firmware_id.clone(),
            module: e.module.clone(),
            dest_version: e.dest_version.clone(),
            from_status: e.from_state.as_str().to_owned(),
            status: e.to_state.as_str().to_owned(),
            event: e.event.clone(),
            reason,
            progress: e.progress,
            attempt: e.attempt,
        }
    }
}

impl ForwardMessage {
    fn new(
        kind: MessageKind,
        product_key: &str,
        device_name: &str,
        topic: String,
        generate_time_ms: i64,
        body: Value,
    ) -> Self {
        ForwardMessage {
            kind,
            product_key: product_key.to_owned(),
            device_name: device_name.to_owned(),
            topic,
            generate_time_ms,
            // Serialising a `Value` cannot fail.
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    /// A property post (`items` use the `{value, time}` form, with `received_at_ms` where the
    /// device sent no time).
    pub fn property_post(
        product_key: &str,
        device_name: &str,
        req: &PropertyPostRequest,
        received_at_ms: i64,
    ) -> Self {
        let items: Map<String, Value> = req
            .items(received_at_ms.max(0) as u64)
            .into_iter()
            .map(|(k, item)| (k, json!({"value": item.value, "time": item.time})))
            .collect();
        let body = json!({
            "iotId": iot_id(product_key, device_name),
            "requestId": req.id.as_str(),
            "productKey": product_key,
            "deviceName": device_name,
            "gmtCreate": received_at_ms,
            "deviceType": "CustomCategory",
            "items": items,
        });
        Self::new(
            MessageKind::PropertyPost,
            product_key,
            device_name,
            format!("/{product_key}/{device_name}/thing/event/property/post"),
            received_at_ms,
            body,
        )
    }

    /// A TSL event post for `identifier` (the topic's). Without a TSL model the event's `name`
    /// is its identifier and its `type` is `info`.
    pub fn event_post(
        product_key: &str,
        device_name: &str,
        identifier: &str,
        req: &EventPostRequest,
        received_at_ms: i64,
    ) -> Self {
        let body = json!({
            "identifier": identifier,
            "name": identifier,
            "type": "info",
            "value": req.params.value,
            "time": req.time_or(received_at_ms.max(0) as u64),
            "iotId": iot_id(product_key, device_name),
            "productKey": product_key,
            "deviceName": device_name,
            "requestId": req.id.as_str(),
            "gmtCreate": received_at_ms,
        });
        Self::new(
            MessageKind::EventPost,
            product_key,
            device_name,
            format!("/{product_key}/{device_name}/thing/event/{identifier}/post"),
            received_at_ms,
            body,
        )
    }

    /// A device went online or offline at `at_ms`; `last_time_ms` is its previous contact
    /// (`at_ms` when unknown). Times are rendered like the vendor's: `time` as
    /// `yyyy-MM-dd HH:mm:ss.SSS` (UTC here) and `utcTime` as ISO 8601.
    pub fn status(
        product_key: &str,
        device_name: &str,
        online: bool,
        client_ip: Option<&str>,
        at_ms: i64,
        last_time_ms: Option<i64>,
    ) -> Self {
        let last = last_time_ms.unwrap_or(at_ms);
        let body = json!({
            "status": if online { "online" } else { "offline" },
            "iotId": iot_id(product_key, device_name),
            "productKey": product_key,
            "deviceName": device_name,
            "time": format_time(at_ms, false),
            "utcTime": format_time(at_ms, true),
            "lastTime": format_time(last, false),
            "utcLastTime": format_time(last, true),
            "clientIp": client_ip.unwrap_or(""),
        });
        Self::new(
            MessageKind::Status,
            product_key,
            device_name,
            format!("/as/mqtt/status/{product_key}/{device_name}"),
            at_ms,
            body,
        )
    }

    /// The device answered the property set or service call sent on `request_topic`
    /// (the vendor's `thing/downlink/reply/message`).
    pub fn downlink_reply(
        product_key: &str,
        device_name: &str,
        request_topic: &str,
        reply: &fleetgate_topics::Reply,
        received_at_ms: i64,
    ) -> Self {
        let body = json!({
            "gmtCreate": received_at_ms,
            "iotId": iot_id(product_key, device_name),
            "productKey": product_key,
            "deviceName": device_name,
            "requestId": reply.id,
            "code": reply.code,
            "message": reply.message,
            "topic": request_topic,
            "data": reply.data,
        });
        Self::new(
            MessageKind::DownlinkReply,
            product_key,
            device_name,
            format!("/{product_key}/{device_name}/thing/downlink/reply/message"),
            received_at_ms,
            body,
        )
    }

    /// An OTA task of the device changed state (see [`ForwardMessage::ota_task_event`]).
    pub fn ota_task_state(
        product_key: &str,
        device_name: &str,
        change: &OtaTaskStateChange,
        at_ms: i64,
    ) -> Self {
        let body = json!({
            "iotId": iot_id(product_key, device_name),
            "productKey": product_key,
            "deviceName": device_name,
            "jobId": change.job_id,
            "firmwareId": change.firmware_id,
            "moduleName": change.module,
            "destVersion": change.dest_version,
            "fromStatus": change.from_status,
            "status": change.status,
            "event": change.event,
            "desc": change.reason,
            "step": change.progress,
            "attempt": change.attempt,
            "gmtCreate": at_ms,
        });
        Self::new(
            MessageKind::OtaTaskState,
            product_key,
            device_name,
            format!("/{product_key}/{device_name}/ota/task/state"),
            at_ms,
            body,
        )
    }
}

impl ForwardMessage {
    /// The message for one OTA engine event.
    pub fn ota_task_event(e: &TaskEvent) -> Self {
        Self::ota_task_state(&e.product_key, &e.device_name, &e.into(), e.at_ms)
    }
}

/// `ms` since the epoch as `2024-01-31 12:00:00.123` (`iso = false`) or
/// `2024-01-31T12:00:00.123Z` (`iso = true`), always UTC.
pub fn format_time(ms: i64, iso: bool) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    if iso {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{millis:03}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}.{millis:03}")
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}
