//! Broadcasts: one message to many devices of a product (a list, a tag, or the whole product),
//! at most [`MAX_BROADCAST`] per call, paced by the shared `commands.broadcast_per_sec` limiter,
//! with a result per device.

use super::*;

impl Commands {
    /// Publishes `payload` on `topic_template` (with `{dn}` standing for each device's name and
    /// `{pk}` for the product key) to each target, at most [`MAX_BROADCAST`], paced by the
    /// shared broadcast rate. Per-device results, in target order.
    pub async fn broadcast(
        &self,
        pk: &str,
        targets: Targets,
        topic_template: &str,
        payload: Bytes,
        qos: Qos,
    ) -> Result<Vec<BroadcastResult>, CommandError> {
        if !topic_template.contains("{dn}") {
            return Err(CommandError::Invalid {
                field: "topic",
                message: "a broadcast topic must contain {dn} (e.g. /{pk}/{dn}/user/cmd)".into(),
            });
        }
        let names = self.resolve(pk, targets)?;
        let mut results = Vec::with_capacity(names.len());
        for dn in names {
            self.broadcast_limit.until_ready().await;
            let topic = topic_template.replace("{pk}", pk).replace("{dn}", &dn);
            let message = Message {
                topic,
                payload: payload.clone(),
                qos,
            };
            let (result, message_id, error) = match self.publish(pk, &dn, message).await {
                Ok(sent) if sent.status == SendStatus::Queued => {
                    ("queued", Some(sent.message_id), None)
                }
                Ok(sent) => ("sent", Some(sent.message_id), None),
                Err(e @ (CommandError::Offline { .. } | CommandError::OfflineQueueFull { .. })) => {
                    ("offline", None, Some(e.to_string()))
                }
                Err(e @ CommandError::Registry(RegistryError::NotFound { .. })) => {
                    ("not_found", None, Some(e.to_string()))
                }
                Err(e) => ("refused", None, Some(e.to_string())),
            };
            results.push(BroadcastResult {
                device_name: dn,
                result: result.to_owned(),
                message_id,
                error,
            });
        }
        Ok(results)
    }

    /// The device names a broadcast addresses.
    fn resolve(&self, pk: &str, targets: Targets) -> Result<Vec<String>, CommandError> {
        let filter = match targets {
            Targets::Devices(names) => {
                self.registry.get_product(pk)?;
                let mut seen = std::collections::HashSet::new();
                let names: Vec<String> = names
                    .into_iter()
                    .filter(|n| seen.insert(n.clone()))
                    .collect();
                if names.len() > MAX_BROADCAST {
                    return Err(CommandError::TooMany {
                        max: MAX_BROADCAST,
                        selected: names.len() as u64,
                    });
                }
                return Ok(names);
            }
            Targets::Tag { key, value } => DeviceFilter {
                online: None,
                tag_key: Some(key),
                tag_value: value,
            },
            Targets::Product => DeviceFilter::default(),
        };
        let page_size = crate::registry::MAX_PAGE_SIZE;
        let mut names = Vec::new();
        for page in 1u32.. {
            let paged = self
                .registry
                .list_devices(pk, &filter, Page::new(page, page_size)?)?;
            if paged.total > MAX_BROADCAST as u64 {
                return Err(CommandError::TooMany {
                    max: MAX_BROADCAST,
                    selected: paged.total,
                });
            }
            let last = paged.items.len() < page_size as usize;
            names.extend(paged.items.into_iter().map(|d| d.device_name));
            if last || names.len() as u64 >= paged.total {
                break;
            }
        }
        Ok(names)
    }
}
