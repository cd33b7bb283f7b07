//! A simulated device's telemetry: property and event posts on the scenario's interval, and
//! the `post_reply`s that answer them (late or missing ones counted).

use super::*;

impl Device {
    pub(super) fn expire_pending(&mut self) {
        let timeout = secs(self.sh.telemetry.reply_timeout_secs);
        let mut missing = 0;
        while let Some((_, at)) = self.pending.front() {
            if at.elapsed() < timeout && self.pending.len() <= MAX_PENDING_REPLIES {
                break;
            }
            self.pending.pop_front();
            missing += 1;
        }
        if missing > 0 {
            self.sh.stats.replies_missing.fetch_add(missing, Relaxed);
            self.rec.with(|o| o.replies_missing += missing);
        }
    }

    pub(super) fn on_reply(&mut self, payload: &[u8]) {
        let st = &self.sh.stats;
        let Ok(r) = Reply::parse(payload) else {
            st.replies_unmatched.fetch_add(1, Relaxed);
            return;
        };
        st.count_reply(r.code);
        match self.pending.iter().position(|(id, _)| *id == r.id) {
            Some(i) => {
                self.pending.remove(i);
                let ok = r.is_success();
                self.rec.with(|o| {
                    if ok {
                        o.replies_ok += 1
                    } else {
                        o.replies_error += 1
                    }
                });
            }
            // An empty id answers a post that could not be read (our malformed ones).
            None if r.id.is_empty() => {}
            None => {
                st.replies_unmatched.fetch_add(1, Relaxed);
            }
        }
    }

    pub(super) fn next_value(&mut self, i: usize) -> serde_json::Value {
        let p = &self.sh.telemetry.properties[i];
        let round = |v: f64| {
            let f = 10f64.powi(i32::from(p.decimals));
            serde_json::Number::from_f64((v * f).round() / f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null)
        };
        match p.kind {
            PropertyKind::RandomWalk => {
                let step = if p.step > 0.0 {
                    self.rng.gen_range(-p.step..=p.step)
                } else {
                    0.0
                };
                self.values[i] = (self.values[i] + step).clamp(p.min, p.max);
                round(self.values[i])
            }
            PropertyKind::Counter => {
                let v = self.values[i];
                self.values[i] += p.step;
                if v.fract() == 0.0 && v.abs() < 9.0e15 {
                    serde_json::Value::from(v as i64)
                } else {
                    round(v)
                }
            }
            PropertyKind::Choice => {
                let k = self.rng.gen_range(0..p.values.len().max(1));
                p.values.get(k).cloned().unwrap_or_default()
            }
            PropertyKind::Constant => p.values.first().cloned().unwrap_or_default(),
        }
    }

    pub(super) fn post_telemetry(&mut self, client: &AsyncClient) {
        self.expire_pending();
        let now = unix_ms();
        let items: BTreeMap<String, Item> = (0..self.sh.telemetry.properties.len())
            .map(|i| {
                let value = self.next_value(i);
                let name = self.sh.telemetry.properties[i].name.clone();
                (name, Item { value, time: now })
            })
            .collect();
        let id = self.rec.next_id().to_string();
        let mut payload = PropertyPostRequest::new(id.clone(), items).to_vec();
        let seq = self.post_seq;
        self.post_seq += 1;
        let plan = &self.sh.plan;
        let check_replies = self.sh.telemetry.reply_timeout_secs > 0.0;
        let malformed = plan.has_telemetry_rules() && {
            let versions: Vec<(&str, &str)> = self
                .versions
                .iter()
                .map(|(m, v)| (m.as_str(), v.as_str()))
                .collect();
            plan.malformed_post(&self.rec.spec.device_name, &versions, seq)
        };
        if malformed {
            payload.truncate(payload.len() / 2);
            self.sh.stats.malformed_sent.fetch_add(1, Relaxed);
        } else if check_replies {
            self.pending.push_back((id, Instant::now()));
        }
        self.publish(
            client,
            self.rec.topic(TopicKind::PropertyPost, None),
            TopicKind::PropertyPost,
            payload,
        );
        self.sh.stats.property_posts.fetch_add(1, Relaxed);

        let mut events = 0;
        for e in &self.sh.telemetry.events {
            if !self.rng.gen_bool(e.probability) {
                continue;
            }
            let id = self.rec.next_id().to_string();
            let req = EventPostRequest::new(id.clone(), &e.identifier, e.value.clone(), Some(now));
            if check_replies {
                self.pending.push_back((id, Instant::now()));
            }
            self.publish(
                client,
                self.rec.topic(TopicKind::EventPost, Some(&e.identifier)),
                TopicKind::EventPost,
                req.to_vec(),
            );
            events += 1;
        }
        self.sh.stats.event_posts.fetch_add(events, Relaxed);
        self.rec.with(|o| {
            o.property_posts += 1;
            o.event_posts += events;
        });
    }
}
