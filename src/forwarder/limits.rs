//! Rate limits per target instance: the GCRA limiters (governor) the publisher consults for
//! every row, and where each target's limit comes from.
//!
//! A target's limit is, in this order:
//!
//! 1. its **override**, set at runtime ([`Forwarder::set_rate_limit`](super::Forwarder::set_rate_limit),
//!    `PUT /api/v1/instances/{iid}/forwarding/rate-limit`) — both bounds absent means
//!    "explicitly unlimited", whatever the default says;
//! 2. else the configured **default** (`amqp.rate_limit_msgs_per_sec` / `_bytes_per_sec`);
//! 3. else none.
//!
//! Overrides are store documents (`kind = "amqp.rate_limit"`, id = instance id, body = the
//! [`RateLimit`] as JSON), loaded when the forwarder is built, so they survive a restart and
//! exist while forwarding is off. Mirror limits (the migration's `bandwidth_limit_mb`) are a
//! separate layer on top, for mirrored rows only (see the [module docs](super)).
//!
//! This module owns the limiter state; the forwarder owns persisting overrides.

use super::ForwarderError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use utoipa::ToSchema;

/// Store document kind of a per-instance rate-limit override.
pub const RATE_LIMIT_DOC_KIND: &str = "amqp.rate_limit";

/// A rate limit for one target instance. Either or both bounds may be set; neither set means
/// unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub msgs_per_sec: Option<NonZeroU32>,
    pub bytes_per_sec: Option<NonZeroU32>,
}

impl RateLimit {
    /// No bound on either axis.
    pub const UNLIMITED: RateLimit = RateLimit {
        msgs_per_sec: None,
        bytes_per_sec: None,
    };

    pub fn is_unlimited(&self) -> bool {
        self.msgs_per_sec.is_none() && self.bytes_per_sec.is_none()
    }
}

/// Body of `PUT /api/v1/instances/{iid}/forwarding/rate-limit`. A null or absent bound is
/// unlimited on that axis, so `{}` is an explicit "unlimited" that overrides the configured
/// default. 0 is refused (omit the bound instead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitRequest {
    /// Messages per second, 1..=4294967295; null = no message bound.
    #[schema(minimum = 1, maximum = 4294967295_u32)]
    pub msgs_per_sec: Option<u32>,
    /// Bytes (message bodies) per second, 1..=4294967295; null = no byte bound. A message
    /// larger than one second's budget is let through rather than blocked forever.
    #[schema(minimum = 1, maximum = 4294967295_u32)]
    pub bytes_per_sec: Option<u32>,
}

impl RateLimitRequest {
    /// The limit asked for; a 0 bound is [`ForwarderError::Invalid`] naming the field.
    pub fn parse(self) -> Result<RateLimit, ForwarderError> {
        let bound = |v: Option<u32>, field: &'static str| match v {
            None => Ok(None),
            Some(n) => NonZeroU32::new(n)
                .map(Some)
                .ok_or_else(|| ForwarderError::Invalid {
                    field,
                    message: "must be at least 1 (null for no bound)".into(),
                }),
        };
        Ok(RateLimit {
            msgs_per_sec: bound(self.msgs_per_sec, "msgs_per_sec")?,
            bytes_per_sec: bound(self.bytes_per_sec, "bytes_per_sec")?,
        })
    }
}

/// Where an instance's effective rate limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitSource {
    /// Set for this instance through the API (persisted).
    Instance,
    /// The configured default (`amqp.rate_limit_msgs_per_sec` / `_bytes_per_sec`).
    Default,
    /// No limit at all: no override and no configured default.
    None,
}

/// The rate limit forwarding to one instance runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceRateLimit {
    pub instance_id: String,
    /// Messages per second; null = no message bound.
    pub msgs_per_sec: Option<u32>,
    /// Bytes per second; null = no byte bound.
    pub bytes_per_sec: Option<u32>,
    pub source: RateLimitSource,
}

impl InstanceRateLimit {
    pub(crate) fn new(
        instance_id: &str,
        limit: Option<RateLimit>,
        source: RateLimitSource,
    ) -> Self {
        let limit = limit.unwrap_or(RateLimit::UNLIMITED);
        InstanceRateLimit {
            instance_id: instance_id.to_owned(),
            msgs_per_sec: limit.msgs_per_sec.map(NonZeroU32::get),
            bytes_per_sec: limit.bytes_per_sec.map(NonZeroU32::get),
            source,
        }
    }
}

/// GCRA limiters (governor) of one target. Bursts are one second's worth.
pub(crate) struct Limiter {
    clock: DefaultClock,
    msgs: Option<DefaultDirectRateLimiter>,
    bytes: Option<DefaultDirectRateLimiter>,
}

impl Limiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let clock = DefaultClock::default();
        let make =
            |n: NonZeroU32| RateLimiter::direct_with_clock(Quota::per_second(n), clock.clone());
        Limiter {
            msgs: limit.msgs_per_sec.map(make),
            bytes: limit.bytes_per_sec.map(make),
            clock,
        }
    }

    /// Takes one message of `size` bytes, or says how long to wait.
    pub fn check(&self, size: u64) -> Result<(), Duration> {
        if let Some(m) = &self.msgs {
            m.check()
                .map_err(|nu| nu.wait_time_from(self.clock.now()))?;
        }
        if let Some(b) = &self.bytes {
            let n = NonZeroU32::new(size.clamp(1, u64::from(u32::MAX)) as u32)
                .unwrap_or(NonZeroU32::MIN);
            match b.check_n(n) {
                Ok(Ok(())) => {}
                Ok(Err(nu)) => return Err(nu.wait_time_from(self.clock.now())),
                // Larger than a whole second's budget: it can never conform, so let it pass
                // rather than block the target forever.
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// Overrides and the limiters built from them (or from the configured default), per target.
#[derive(Default)]
pub(crate) struct Limits {
    /// The configured default (`amqp.rate_limit_*`), for targets without an override.
    default: Option<RateLimit>,
    /// Runtime overrides per instance (mirrors the store documents).
    overrides: HashMap<String, RateLimit>,
    /// Effective limiter per target, built on first use; `None` = unlimited.
    limiters: HashMap<String, Option<Arc<Limiter>>>,
}

impl Limits {
    pub fn new(default: Option<RateLimit>, overrides: HashMap<String, RateLimit>) -> Self {
        Limits {
            default,
            overrides,
            limiters: HashMap::new(),
        }
    }

    /// The limit of `target` and where it comes from.
    pub fn effective(&self, target: &str) -> (Option<RateLimit>, RateLimitSource) {
        match (self.overrides.get(target), self.default) {
            (Some(l), _) => (Some(*l), RateLimitSource::Instance),
            (None, Some(d)) => (Some(d), RateLimitSource::Default),
            (None, None) => (None, RateLimitSource::None),
        }
    }

    pub fn has_override(&self, target: &str) -> bool {
        self.overrides.contains_key(target)
    }

    /// The override of `target`, if any.
    pub fn override_of(&self, target: &str) -> Option<RateLimit> {
        self.overrides.get(target).copied()
    }

    /// Every target with an override.
    pub fn overridden(&self) -> Vec<String> {
        self.overrides.keys().cloned().collect()
    }

    /// The limiter of `target` (built on first use).
    pub fn limiter(&mut self, target: &str) -> Option<Arc<Limiter>> {
        if let Some(l) = self.limiters.get(target) {
            return l.clone();
        }
        let l = self.build(target);
        self.limiters.insert(target.to_owned(), l.clone());
        l
    }

    /// Sets (`Some`) or removes (`None`) the override of `target` and replaces its limiter
    /// (the new one starts with a full burst).
    pub fn set_override(&mut self, target: &str, limit: Option<RateLimit>) {
        match limit {
            Some(l) => self.overrides.insert(target.to_owned(), l),
            None => self.overrides.remove(target),
        };
        let l = self.build(target);
        self.limiters.insert(target.to_owned(), l);
    }

    fn build(&self, target: &str) -> Option<Arc<Limiter>> {
        match self.effective(target).0 {
            Some(l) if !l.is_unlimited() => Some(Arc::new(Limiter::new(l))),
            _ => None,
        }
    }
}
