//! Prometheus metrics of the embedded broker, served on `[metrics] listen`.
//!
//! They are the front end's counters ([`crate::BrokerStats`]), copied into a registry at each
//! scrape, so a scrape sees every refusal counted before it. rumqttd's router is not
//! instrumented: everything here is what the front end sees of each client connection.
//!
//! | metric | meaning |
//! |---|---|
//! | `coevo_broker_connections_open` | client connections open now |
//! | `coevo_broker_connection_capacity` | connections served at once (`max_connections`, or less when the open-file limit is lower) |
//! | `coevo_broker_connections_accepted_total` | CONNECTs admitted |
//! | `coevo_broker_connects_refused_total{reason}` | CONNECTs refused: `bad-password`, `unknown-client`, `client-id-mismatch`, `invalid-client-id` (authentication, CONNACK 4 or 2) and `busy` (CONNACK 3, admission control: the client backs off) |
//! | `coevo_broker_connections_over_limit_total` | sockets over `max_connections` |
//! | `coevo_broker_acl_denials_total{packet}` | `publish` (including a CONNECT's last will) or `subscribe` outside the client's topics: the connection was closed |
//! | `coevo_broker_protocol_violations_total` | connections closed for not speaking MQTT 3.1.1 as a client must |
//! | `coevo_broker_revoked_disconnects_total` | open connections closed because their client was removed or its password changed |
//! | `coevo_broker_credential_reloads_total{result}` | credential file reloads, `ok` or `error` (the previous set stays in force) |
//! | `coevo_broker_publishes_received_total` | PUBLISH packets from clients that passed the ACL |
//! | `coevo_broker_received_bytes_total`, `coevo_broker_sent_bytes_total` | MQTT bytes from and to admitted clients |

use crate::front::Front;
use crate::BrokerError;
use coevo_telemetry::{Counter, Gauge, MetricsServer, Registry};
use std::net::SocketAddr;
use std::sync::Arc;

/// Reads one refusal count out of the front end's counters.
type Field = fn(&crate::BrokerStats) -> u64;

/// The broker's registry and the handles the front end's counters are copied into.
struct BrokerMetrics {
    registry: Registry,
    open: Gauge,
    capacity: Gauge,
    accepted: Counter,
    refused: [(Counter, Field); 5],
    over_limit: Counter,
    acl_publish: Counter,
    acl_subscribe: Counter,
    protocol: Counter,
    revoked: Counter,
    reloads_ok: Counter,
    reloads_error: Counter,
    publishes_in: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl BrokerMetrics {
    fn new(capacity: usize) -> Self {
        let r = Registry::new();
        let refused = |reason: &'static str| {
            r.counter_with(
                "coevo_broker_connects_refused_total",
                "CONNECTs refused, by reason: authentication (bad-password, unknown-client, client-id-mismatch, invalid-client-id) or busy (CONNACK 3).",
                &[("reason", reason)],
            )
        };
        let acl = |packet: &'static str| {
            r.counter_with(
                "coevo_broker_acl_denials_total",
                "PUBLISHes (and last wills) and SUBSCRIBEs outside the client's topics; each closed its connection.",
                &[("packet", packet)],
            )
        };
        let reloads = |result: &'static str| {
            r.counter_with(
                "coevo_broker_credential_reloads_total",
                "Credential file reloads (error: the previous credentials stay in force).",
                &[("result", result)],
            )
        };
        let m = BrokerMetrics {
            open: r.gauge(
                "coevo_broker_connections_open",
                "Client connections open now.",
            ),
            capacity: r.gauge(
                "coevo_broker_connection_capacity",
                "Connections served at once (max_connections, or less under a low open-file limit).",
            ),
            accepted: r.counter(
                "coevo_broker_connections_accepted_total",
                "CONNECTs admitted and handed to the router.",
            ),
            refused: [
                (refused("bad-password"), |s| s.auth_bad_password),
                (refused("unknown-client"), |s| s.auth_unknown_client),
                (refused("client-id-mismatch"), |s| s.client_id_mismatch),
                (refused("invalid-client-id"), |s| s.auth_invalid_id),
                (refused("busy"), |s| s.connects_busy),
            ],
            over_limit: r.counter(
                "coevo_broker_connections_over_limit_total",
                "Sockets refused because max_connections were open.",
            ),
            acl_publish: acl("publish"),
            acl_subscribe: acl("subscribe"),
            protocol: r.counter(
                "coevo_broker_protocol_violations_total",
                "Connections closed for not speaking MQTT 3.1.1 as a client must.",
            ),
            revoked: r.counter(
                "coevo_broker_revoked_disconnects_total",
                "Open connections closed because their client was removed or its password changed.",
            ),
            reloads_ok: reloads("ok"),
            reloads_error: reloads("error"),
            publishes_in: r.counter(
                "coevo_broker_publishes_received_total",
                "PUBLISH packets from clients that passed the topic ACL.",
            ),
            bytes_in: r.counter(
                "coevo_broker_received_bytes_total",
                "MQTT bytes received from admitted clients.",
            ),
            bytes_out: r.counter(
                "coevo_broker_sent_bytes_total",
                "MQTT bytes sent to admitted clients.",
            ),
            registry: r,
        };
        m.capacity.set(capacity as f64);
        m
    }

    /// Copies `s` into the registry and renders it.
    fn render(&self, s: &crate::BrokerStats) -> String {
        self.open.set(s.connections_open as f64);
        self.accepted.absolute(s.connections_accepted);
        for (c, get) in &self.refused {
            c.absolute(get(s));
        }
        self.over_limit.absolute(s.connections_over_limit);
        self.acl_publish.absolute(s.acl_refused_publish);
        self.acl_subscribe.absolute(s.acl_refused_subscribe);
        self.protocol.absolute(s.protocol_violations);
        self.revoked.absolute(s.revoked_disconnects);
        self.reloads_ok.absolute(s.credential_reloads);
        self.reloads_error.absolute(s.credential_reload_errors);
        self.publishes_in.absolute(s.publishes_in);
        self.bytes_in.absolute(s.bytes_in);
        self.bytes_out.absolute(s.bytes_out);
        self.registry.render()
    }
}

/// Starts the endpoint on `listen`, rendering `front`'s counters at each scrape.
pub(crate) fn serve(
    listen: SocketAddr,
    front: Arc<Front>,
    capacity: usize,
) -> Result<MetricsServer, BrokerError> {
    let metrics = BrokerMetrics::new(capacity);
    let server = MetricsServer::start(
        listen,
        "coevo-broker",
        Arc::new(move || metrics.render(&front.counters.snapshot())),
    )?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_reaches_its_metric() {
        let m = BrokerMetrics::new(100);
        let stats = crate::BrokerStats {
            connections_open: 3,
            connections_accepted: 7,
            auth_bad_password: 2,
            auth_unknown_client: 1,
            client_id_mismatch: 4,
            auth_invalid_id: 5,
            connects_busy: 6,
            acl_refused_publish: 8,
            acl_refused_subscribe: 9,
            bytes_in: 1000,
            bytes_out: 2000,
            ..Default::default()
        };
        let s = coevo_telemetry::parse(&m.render(&stats)).unwrap();
        let refused = |r| s.value("coevo_broker_connects_refused_total", &[("reason", r)]);
        assert_eq!(refused("bad-password"), Some(2.0));
        assert_eq!(refused("unknown-client"), Some(1.0));
        assert_eq!(refused("client-id-mismatch"), Some(4.0));
        assert_eq!(refused("invalid-client-id"), Some(5.0));
        assert_eq!(refused("busy"), Some(6.0));
        assert_eq!(s.value("coevo_broker_connections_open", &[]), Some(3.0));
        assert_eq!(
            s.value("coevo_broker_connection_capacity", &[]),
            Some(100.0)
        );
        assert_eq!(
            s.value("coevo_broker_acl_denials_total", &[("packet", "subscribe")]),
            Some(9.0)
        );
        assert_eq!(s.value("coevo_broker_sent_bytes_total", &[]), Some(2000.0));
        // Counters follow the front end's on the next scrape.
        let later = crate::BrokerStats {
            connections_accepted: 8,
            ..stats
        };
        let s = coevo_telemetry::parse(&m.render(&later)).unwrap();
        assert_eq!(
            s.value("coevo_broker_connections_accepted_total", &[]),
            Some(8.0)
        );
    }
}
