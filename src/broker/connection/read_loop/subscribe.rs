//! SUBSCRIBE and UNSUBSCRIBE from the device: their filters checked, the ACL and the
//! per-device filter budget applied, the rest handed to the router.

use crate::broker::connection::{auto_subscribe_filters, Conn, Flow, Live, PendingSubAck, Socket};
use crate::broker::violation::{self, Violation};
use crate::broker::{acl, DeviceHooks, DisconnectReason};
use rumqttd::protocol::{
    Filter, Packet, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};

/// A SUBSCRIBE: its filters checked (a malformed one ends the connection), then those the ACL
/// allows go to the router, whose SUBACK is completed with the refused ones (all refused: our
/// own SUBACK at once).
pub(super) fn on_subscribe<S, H>(
    subscribe: Subscribe,
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
    to_link: &mut Vec<Packet>,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let lost = |_| DisconnectReason::ConnectionLost;
    // (A SUBSCRIBE without filters does not even parse: `Violation::EmptySubscribe`.)
    let checked = subscribe
        .filters
        .iter()
        .try_for_each(|f| violation::topic_filter(&f.path));
    if let Err(violation) = checked {
        violation.emit(&live.shared.metrics);
        return Err(DisconnectReason::ConnectionLost);
    }
    let allowed = subscription_allowed(live, &subscribe.filters);
    let denied = allowed.iter().filter(|ok| !**ok).count();
    if denied == allowed.len() {
        let suback = SubAck {
            pkid: subscribe.pkid,
            return_codes: vec![SubscribeReasonCode::Failure; denied],
        };
        return conn.queue(Packet::SubAck(suback, None)).map_err(lost);
    }
    let filters: Vec<Filter> = subscribe
        .filters
        .into_iter()
        .zip(&allowed)
        .filter_map(|(f, ok)| ok.then_some(f))
        .collect();
    let paths = filters.iter().map(|f| f.path.clone()).collect();
    to_link.push(Packet::Subscribe(
        Subscribe {
            pkid: subscribe.pkid,
            filters,
        },
        None,
    ));
    flow.pending_subacks.push_back(PendingSubAck {
        pkid: subscribe.pkid,
        allowed,
        paths,
    });
    Ok(())
}

/// An UNSUBSCRIBE: its filters checked (none, or a malformed one, ends the connection); the
/// device's own ones stop delivering now and go to the router; answered by us.
pub(super) fn on_unsubscribe<S, H>(
    unsubscribe: Unsubscribe,
    conn: &mut Conn<S>,
    live: &Live<H>,
    to_link: &mut Vec<Packet>,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let lost = |_| DisconnectReason::ConnectionLost;
    let device = &live.session.device;
    let checked = match unsubscribe.filters.is_empty() {
        true => Err(Violation::EmptyUnsubscribe),
        false => unsubscribe
            .filters
            .iter()
            .try_for_each(|f| violation::topic_filter(f)),
    };
    if let Err(violation) = checked {
        violation.emit(&live.shared.metrics);
        return Err(DisconnectReason::ConnectionLost);
    }
    // Filters the device could not have subscribed are skipped. rumqttd sends no UNSUBACK
    // for a filter that was not subscribed, so we always answer ourselves (and drop the
    // router's UNSUBACKs).
    let owned: Vec<String> = unsubscribe
        .filters
        .into_iter()
        .filter(|f| acl::filter_allowed(&device.product_key, &device.device_name, f))
        .collect();
    // Direct deliveries stop now; the router forgets the subscription right after.
    for filter in &owned {
        live.handle.revoke(filter);
    }
    if !owned.is_empty() {
        to_link.push(Packet::Unsubscribe(
            Unsubscribe {
                pkid: unsubscribe.pkid,
                filters: owned,
            },
            None,
        ));
    }
    let unsuback = UnsubAck {
        pkid: unsubscribe.pkid,
        reasons: vec![],
    };
    conn.queue(Packet::UnsubAck(unsuback, None)).map_err(lost)
}

/// Which of a SUBSCRIBE's filters the device may have: its own (the ACL) and within its budget of
/// distinct filters ([`crate::broker::filters`]). Refusals are counted and logged.
fn subscription_allowed<H: DeviceHooks>(live: &Live<H>, filters: &[Filter]) -> Vec<bool> {
    let device = &live.session.device;
    let metrics = &live.shared.metrics;
    let auto = auto_subscribe_filters(device);
    let (mut foreign, mut over_budget) = (0u64, 0u64);
    let allowed = filters
        .iter()
        .map(|f| {
            if !acl::filter_allowed(&device.product_key, &device.device_name, &f.path) {
                foreign += 1;
                return false;
            }
            if auto.iter().any(|(path, _)| *path == f.path)
                || live.shared.filters.admit(device, &f.path)
            {
                return true;
            }
            over_budget += 1;
            false
        })
        .collect();
    if foreign > 0 {
        metrics
            .acl_denied
            .get_or_create(&[("kind", "subscribe")])
            .inc_by(foreign);
        tracing::debug!(denied = foreign, "subscription refused by ACL");
    }
    if over_budget > 0 {
        metrics.subscriptions_refused.inc_by(over_budget);
        tracing::debug!(
            refused = over_budget,
            max = live.shared.config.max_subscriptions_per_device,
            "subscription refused: the device's filter limit is reached"
        );
    }
    allowed
}
