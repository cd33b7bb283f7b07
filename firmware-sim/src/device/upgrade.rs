//! One upgrade attempt of a simulated device, run as a child task: download (with the
//! scenario's faults at byte offsets), progress reports (with the message-level faults), the
//! terminal fault or success, and the reboot it asks its device for.

use super::*;

/// One upgrade attempt, run as a child task of its device.
pub(super) struct Job {
    pub(super) rec: Arc<DeviceRecord>,
    pub(super) sh: Arc<Shared>,
    pub(super) tx: mpsc::Sender<Cmd>,
    pub(super) seq: u32,
    pub(super) data: UpgradeData,
    pub(super) faults: UpgradeFaults,
}

/// What can strike during the download, at a byte offset.
#[derive(Debug)]
enum Point {
    Malformed,
    Interrupt,
    Offline(Duration),
    UpdateFailed,
    DownloadFailed,
    Hang,
}

/// Sends progress messages, applying the message-level faults.
struct Reporter {
    tx: mpsc::Sender<Cmd>,
    rec: Arc<DeviceRecord>,
    seq: u32,
    topic: String,
    module: String,
    duplicate: bool,
    out_of_order: bool,
    held: Option<Vec<u8>>,
}

impl Reporter {
    async fn emit(&self, payload: Vec<u8>) {
        let n = if self.duplicate { 2 } else { 1 };
        for _ in 0..n {
            let _ = self
                .tx
                .send(Cmd::Publish {
                    topic: self.topic.clone(),
                    payload: payload.clone(),
                    ota: true,
                })
                .await;
        }
    }

    async fn step(&mut self, step: i32, desc: &str) {
        let Some(ps) = ProgressStep::from_code(i64::from(step)) else {
            return;
        };
        let payload = ProgressRequest::new(
            self.rec.next_id(),
            ps,
            Some(desc.to_owned()),
            self.module.clone(),
        )
        .to_vec();
        self.rec.with_upgrade(self.seq, |u| u.last_step = step);
        if self.out_of_order && ps.percent().is_some_and(|p| p < 100) {
            match self.held.take() {
                None => self.held = Some(payload),
                Some(prev) => {
                    self.emit(payload).await;
                    self.emit(prev).await;
                }
            }
            return;
        }
        if let Some(prev) = self.held.take() {
            self.emit(prev).await;
        }
        self.emit(payload).await;
    }

    /// A progress message cut in half: not JSON.
    async fn malformed(&self, sh: &Shared) {
        let mut payload = ProgressRequest::new(
            self.rec.next_id(),
            ProgressStep::Percent(50),
            Some("malformed".into()),
            self.module.clone(),
        )
        .to_vec();
        payload.truncate(payload.len() / 2);
        sh.stats.malformed_sent.fetch_add(1, Relaxed);
        let _ = self
            .tx
            .send(Cmd::Publish {
                topic: self.topic.clone(),
                payload,
                ota: true,
            })
            .await;
    }
}

impl Job {
    pub(super) async fn run(self) {
        let (result, reboot) = self.upgrade().await;
        let _ = self
            .tx
            .send(Cmd::Done {
                seq: self.seq,
                module: self.data.module.clone(),
                result,
                reboot,
            })
            .await;
    }

    fn failed(code: i32, reason: impl Into<String>) -> (UpgradeResult, Option<String>) {
        (
            UpgradeResult::Failed {
                code,
                reason: reason.into(),
            },
            None,
        )
    }

    async fn upgrade(&self) -> (UpgradeResult, Option<String>) {
        let sh = &self.sh;
        let ota = &sh.ota;
        let data = &self.data;
        let f = &self.faults;
        let mut rep = Reporter {
            tx: self.tx.clone(),
            rec: self.rec.clone(),
            seq: self.seq,
            topic: self.rec.topic(TopicKind::Progress, None),
            module: data.module.clone(),
            duplicate: f.duplicate_progress,
            out_of_order: f.out_of_order_progress,
            held: None,
        };
        let size = data.size;
        let mut points = fault_points(f, size);

        let mut dl = Download::new(
            sh.http.clone(),
            data.url.clone(),
            size,
            ota.download_retries,
        );
        rep.step(1, "downloading").await;
        let every = i32::from(ota.progress_every_pct);
        let mut last_step = 1;
        loop {
            while points.front().is_some_and(|(o, _)| *o <= dl.received()) {
                let Some((_, point)) = points.pop_front() else {
                    break;
                };
                if let Some(end) = self.reach(point, &mut rep, &mut dl).await {
                    return end;
                }
            }
            let limit = points
                .front()
                .map(|(o, _)| o.saturating_sub(dl.received()).max(1))
                .unwrap_or(u64::MAX);
            let n = match dl.next_chunk(limit).await {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    self.note_resumes(&dl);
                    let msg = e.to_string();
                    rep.step(-2, &format!("download failed: {msg}")).await;
                    return Self::failed(-2, msg);
                }
            };
            sh.stats.bytes_downloaded.fetch_add(n, Relaxed);
            if let Some(bps) = f.slow_bytes_per_sec {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
            }
            let pct = (dl.received() * 100)
                .checked_div(size)
                .map_or(100, |p| p.min(100) as i32);
            let step = (1 + pct * 89 / 100).clamp(1, 90);
            if step >= last_step + every {
                rep.step(step, "downloading").await;
                last_step = step;
            }
        }
        self.note_resumes(&dl);
        let digests = dl.finish();
        if last_step < 90 {
            rep.step(90, "downloaded").await;
        }
        self.install(&mut rep, &digests).await
    }

    /// Acts on a fault point the download reached. `Some`: how the upgrade ends there.
    async fn reach(
        &self,
        point: Point,
        rep: &mut Reporter,
        dl: &mut Download,
    ) -> Option<(UpgradeResult, Option<String>)> {
        match point {
            Point::Malformed => rep.malformed(&self.sh).await,
            Point::Interrupt => dl.interrupt(),
            Point::Offline(d) => {
                let (resume, back) = oneshot::channel();
                let _ = self
                    .tx
                    .send(Cmd::Offline {
                        duration: d,
                        resume,
                    })
                    .await;
                // The device answers once it is connected again; if it is gone, so
                // is this upgrade (it is aborted with it).
                if back.await.is_err() {
                    return Some((UpgradeResult::Interrupted, None));
                }
                // The download's connection did not survive the outage either.
                dl.interrupt();
            }
            Point::UpdateFailed => {
                rep.step(-1, "update failed (injected)").await;
                return Some(Self::failed(-1, "injected update failure"));
            }
            Point::DownloadFailed => {
                rep.step(-2, "download failed (injected)").await;
                return Some(Self::failed(-2, "injected download failure"));
            }
            Point::Hang => {
                // Silence from here on: whatever was held back is never sent either.
                return Some((UpgradeResult::Hung, None));
            }
        }
        None
    }

    /// After the download: verification, writing and the reboot, with their injected faults;
    /// the version the device then runs.
    async fn install(
        &self,
        rep: &mut Reporter,
        digests: &firmware::Digests,
    ) -> (UpgradeResult, Option<String>) {
        let ota = &self.sh.ota;
        let data = &self.data;
        let f = &self.faults;
        let size = data.size;
        tokio::time::sleep(secs(ota.verify_secs)).await;
        if let Err(e) = firmware::verify(digests, size, data.sign_method, &data.sign, &data.md5) {
            let msg = format!("verification failed: {e}");
            rep.step(-3, &msg).await;
            return Self::failed(-3, msg);
        }
        if matches!(f.terminal, Some(TerminalFault::VerifyFailed)) {
            rep.step(-3, "verification failed (injected)").await;
            return Self::failed(-3, "injected verification failure");
        }
        rep.step(93, "verified").await;
        tokio::time::sleep(secs(ota.write_secs / 2.0)).await;
        if matches!(f.terminal, Some(TerminalFault::WriteFailed)) {
            rep.step(-4, "write failed (injected)").await;
            return Self::failed(-4, "injected write failure");
        }
        rep.step(96, "writing").await;
        tokio::time::sleep(secs(ota.write_secs / 2.0)).await;
        rep.step(100, "written, rebooting").await;
        if let Some(prev) = rep.held.take() {
            rep.emit(prev).await;
        }
        match &f.terminal {
            Some(TerminalFault::WrongVersion { version }) => (
                UpgradeResult::WrongVersion {
                    reported: version.clone(),
                },
                Some(version.clone()),
            ),
            _ => (UpgradeResult::Succeeded, Some(data.version.clone())),
        }
    }

    fn note_resumes(&self, dl: &Download) {
        let r = dl.resumes();
        if r > 0 {
            self.sh.stats.range_resumes.fetch_add(u64::from(r), Relaxed);
        }
        self.rec.with_upgrade(self.seq, |u| u.range_resumes = r);
    }
}

/// Where the download meets the injected faults: `(byte offset, point)`, in offset order
/// (at equal offsets, terminal points last).
fn fault_points(f: &UpgradeFaults, size: u64) -> VecDeque<(u64, Point)> {
    let at = |p: u8| size * u64::from(p) / 100;
    let mut points: Vec<(u64, Point)> = Vec::new();
    if let Some(p) = f.malformed_at_percent {
        points.push((at(p), Point::Malformed));
    }
    if let Some(p) = f.interrupt_at_percent {
        points.push((at(p), Point::Interrupt));
    }
    if let Some((p, d)) = f.offline {
        points.push((at(p), Point::Offline(d)));
    }
    match &f.terminal {
        Some(TerminalFault::UpdateFailed { at_percent }) => {
            points.push((at(*at_percent), Point::UpdateFailed))
        }
        Some(TerminalFault::DownloadFailed { at_percent }) => {
            points.push((at(*at_percent), Point::DownloadFailed))
        }
        Some(TerminalFault::Hang { at_percent }) => points.push((at(*at_percent), Point::Hang)),
        _ => {}
    }
    // Stable: at equal offsets the order above holds (terminal points last).
    points.sort_by_key(|(o, _)| *o);
    points.into()
}
