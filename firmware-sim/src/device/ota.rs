//! The device task's side of upgrades: a push or a `firmware/get` answer starts one (the
//! attempt itself runs as a child task, [`upgrade`](super::upgrade)), the child's [`Cmd`]s are
//! carried out on the device's connection (publish, go offline, reboot into the new version),
//! and each upgrade's end is recorded and counted.

use super::*;

impl Device {
    pub(super) fn pull(&mut self, client: &AsyncClient) {
        let modules: Vec<String> = self.versions.keys().cloned().collect();
        for module in modules {
            let req = FirmwareGetRequest::new(self.rec.next_id(), Some(module));
            self.publish(
                client,
                self.rec.topic(TopicKind::FirmwareGet, None),
                TopicKind::FirmwareGet,
                req.to_vec(),
            );
            self.sh.stats.get_requests.fetch_add(1, Relaxed);
        }
        self.sh.stats.ota_activity(self.sh.now_ms());
    }

    pub(super) fn start_upgrade(
        &mut self,
        client: &AsyncClient,
        data: UpgradeData,
        push_id: u64,
        via: &str,
    ) {
        let module = data.module.clone();
        let sh = self.sh.clone();
        let st = &sh.stats;
        if let Some(a) = self.active.get(&module) {
            if a.push_id == push_id && a.to_version == data.version {
                // A redelivery (QoS1) or a repeated pull answer: already on it.
                st.duplicate_pushes.fetch_add(1, Relaxed);
                return;
            }
        }
        if let Some(a) = self.active.remove(&module) {
            a.abort.abort();
            self.end_upgrade(a.seq, UpgradeResult::Superseded, a.started);
        }
        let from = self.versions.get(&module).cloned();
        if from.as_deref() == Some(data.version.as_str()) {
            // Already running the target: say so again, which is what ends the task upstream.
            let p = InformRequest::new(self.rec.next_id(), data.version.clone(), module);
            self.publish(
                client,
                self.rec.topic(TopicKind::Inform, None),
                TopicKind::Inform,
                p.to_vec(),
            );
            return;
        }
        let attempt = {
            let n = self
                .attempts
                .entry((module.clone(), data.version.clone()))
                .or_insert(0);
            *n += 1;
            *n - 1
        };
        let faults = self.sh.plan.for_upgrade(&UpgradeContext {
            device_name: &self.rec.spec.device_name,
            module: &module,
            from_version: from.as_deref(),
            to_version: &data.version,
            attempt,
        });
        let seq = self.upgrade_seq;
        self.upgrade_seq += 1;
        let record = UpgradeRecord {
            seq,
            module: module.clone(),
            from_version: from,
            to_version: data.version.clone(),
            push_id,
            via: via.to_owned(),
            faults: faults.kinds(),
            last_step: 0,
            range_resumes: 0,
            result: UpgradeResult::InProgress,
            elapsed_ms: 0,
        };
        self.rec.with(|o| {
            if o.upgrades.len() >= MAX_UPGRADE_RECORDS {
                o.upgrades.remove(0);
            }
            o.upgrades.push(record);
        });
        st.upgrades_started.fetch_add(1, Relaxed);
        st.updating.fetch_add(1, Relaxed);
        tracing::debug!(device = %self.rec.spec.device_name, %module, to = %data.version, faults = ?faults.kinds(), "upgrade");

        let tx = match &self.cmd_tx {
            Some(tx) => tx.clone(),
            None => {
                // Created on the first upgrade: most devices of a soak never need one.
                let (tx, rx) = mpsc::channel(32);
                self.cmd_tx = Some(tx.clone());
                self.cmd_rx = Some(rx);
                tx
            }
        };
        let job = Job {
            rec: self.rec.clone(),
            sh: self.sh.clone(),
            tx,
            seq,
            data: data.clone(),
            faults,
        };
        let handle = tokio::spawn(job.run());
        self.active.insert(
            module,
            Active {
                seq,
                push_id,
                to_version: data.version,
                started: Instant::now(),
                abort: handle.abort_handle(),
            },
        );
    }

    /// Records an upgrade's final result and updates the counters.
    pub(super) fn end_upgrade(&mut self, seq: u32, result: UpgradeResult, started: Instant) {
        let st = &self.sh.stats;
        match &result {
            UpgradeResult::Succeeded => {
                st.succeeded.fetch_add(1, Relaxed);
            }
            UpgradeResult::Failed { code, .. } => st.count_failure(*code),
            UpgradeResult::Hung => {
                st.hung.fetch_add(1, Relaxed);
            }
            UpgradeResult::WrongVersion { .. } => {
                st.wrong_version.fetch_add(1, Relaxed);
            }
            UpgradeResult::Superseded => {
                st.superseded.fetch_add(1, Relaxed);
            }
            UpgradeResult::Interrupted | UpgradeResult::InProgress => {}
        }
        st.updating.fetch_sub(1, Relaxed);
        let elapsed = started.elapsed().as_millis() as u64;
        self.rec.with_upgrade(seq, |u| {
            u.result = result;
            u.elapsed_ms = elapsed;
        });
    }

    pub(super) fn on_cmd(&mut self, client: &AsyncClient, cmd: Cmd) -> Option<SessionEnd> {
        match cmd {
            Cmd::Publish {
                topic,
                payload,
                ota,
            } => {
                if ota {
                    self.sh.stats.progress_sent.fetch_add(1, Relaxed);
                    self.sh.stats.ota_activity(self.sh.now_ms());
                }
                self.publish(client, topic, TopicKind::Progress, payload);
                None
            }
            Cmd::Offline { duration, resume } => {
                self.resume.push(resume);
                Some(SessionEnd::Offline(duration))
            }
            Cmd::Done {
                seq,
                module,
                result,
                reboot,
            } => {
                let started = match self.active.get(&module) {
                    Some(a) if a.seq == seq => self.active.remove(&module).map(|a| a.started),
                    // Superseded meanwhile; its end is already recorded.
                    _ => return None,
                }?;
                self.sh.stats.ota_activity(self.sh.now_ms());
                let Some(version) = reboot else {
                    self.end_upgrade(seq, result, started);
                    return None;
                };
                // Rebooting stops whatever else was being updated.
                for (_, a) in std::mem::take(&mut self.active) {
                    a.abort.abort();
                    self.end_upgrade(a.seq, UpgradeResult::Interrupted, a.started);
                }
                self.versions.insert(module.clone(), version.clone());
                self.rec.with(|o| {
                    o.versions.insert(module, version);
                });
                self.after_reboot.push((seq, result, started));
                Some(SessionEnd::Reboot(secs(self.sh.ota.reboot_secs)))
            }
        }
    }
}
