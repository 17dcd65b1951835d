//! `coevo fleet export-nats`: hands a fleet to a clustered NATS server (Debian's `nats-server`,
//! 2.9) with its MQTT gateway and JetStream, for a city that outgrows one broker (DESIGN §7b).
//! NATS keeps MQTT sessions, retained messages and unacknowledged QoS 1 deliveries in JetStream
//! streams replicated over the cluster, so a node can die mid-round and its clients reconnect to
//! another without losing the round's manifest, model or queued deltas.
//!
//! Writes `DIR/users.conf` (one user per client, bcrypt hashes from the credential file — no
//! plaintext — and publish/subscribe permissions generated from [`coevo_broker::Acl`], the rule
//! set the embedded broker and the Mosquitto export enforce) and `DIR/node-{i}.conf` for each
//! node (client, cluster and MQTT listeners, JetStream store in `DIR/data/node-{i}`, routes to
//! every other node). Every user is MQTT-only (`allowed_connection_types`), because NATS-protocol
//! clients could otherwise subscribe to the internal delivery subjects (`$MQTT.sub.…`) that
//! every MQTT subscriber at QoS 1 needs permission for.
//!
//! Two differences from the other brokers an operator must know (README "Clustered broker"):
//! NATS 2.9 refuses MQTT topics containing `.`, so ids with a dot are refused here; and NATS does
//! not tie the MQTT client id to the user name, so a camera's credentials can take over another
//! client's *connection* by reusing its client id (not its permissions: NATS re-checks a
//! restored session's subscriptions against the new user's). Give the coordinator an id cameras
//! don't know.

use anyhow::{bail, Context, Result};
use coevo_broker::Credentials;
use coevo_ops::FleetRegistry;
use std::fmt::Write as _;
use std::path::Path;

/// Default cluster size: the smallest that survives losing a node with a JetStream quorum.
pub const DEFAULT_NODES: usize = 3;

/// Where one node listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub host: String,
    /// MQTT listener (cameras, coordinator).
    pub mqtt_port: u16,
    /// NATS protocol listener (operators' `nats` CLI; no fleet user may use it).
    pub client_port: u16,
    /// Cluster route listener (the other nodes).
    pub cluster_port: u16,
    /// HTTP monitoring (`/varz`, `/jsz`, `/healthz`), on `host`; 0: off.
    pub monitor_port: u16,
}

/// What to export.
pub struct Export<'a> {
    pub fleet: &'a str,
    pub coordinator_id: &'a str,
    pub registry: &'a FleetRegistry,
    pub credentials: &'a Credentials,
    pub nodes: Vec<Node>,
    /// Cluster name (NATS refuses routes between differently named clusters).
    pub cluster_name: &'a str,
}

/// The nodes of a cluster: one per host on the same ports when `hosts` are distinct machines,
/// or `count` nodes on one host with consecutive ports (a test or a one-box trial).
pub fn plan_nodes(
    hosts: &[String],
    count: usize,
    mqtt_port: u16,
    client_port: u16,
    cluster_port: u16,
    monitor_port: u16,
) -> Result<Vec<Node>> {
    let one_box = hosts.len() <= 1;
    let n = if one_box { count } else { hosts.len() };
    if n == 0 {
        bail!("a cluster needs at least one node");
    }
    let offset = |base: u16, i: usize| -> Result<u16> {
        if base == 0 {
            return Ok(0);
        }
        let step = if one_box { i } else { 0 };
        u16::try_from(usize::from(base) + step).context("port out of range")
    };
    (0..n)
        .map(|i| {
            Ok(Node {
                host: hosts
                    .get(if one_box { 0 } else { i })
                    .cloned()
                    .unwrap_or_else(|| "127.0.0.1".into()),
                mqtt_port: offset(mqtt_port, i)?,
                client_port: offset(client_port, i)?,
                cluster_port: offset(cluster_port, i)?,
                monitor_port: offset(monitor_port, i)?,
            })
        })
        .collect()
}

/// Writes `users.conf` and one `node-{i}.conf` per node into `dir`; returns the node configs'
/// paths.
pub fn export(e: &Export<'_>, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    coevo_protocol::topic::validate_id(e.fleet)?;
    if e.nodes.is_empty() {
        bail!("a cluster needs at least one node");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let users = users_conf(e)?;
    crate::mosquitto::write_private(&dir.join("users.conf"), users.as_bytes())?;
    let abs = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let routes: Vec<String> = e
        .nodes
        .iter()
        .map(|n| format!("\"nats-route://{}:{}\"", n.host, n.cluster_port))
        .collect();
    // JetStream replicates MQTT state over at most 3 nodes (NATS' own bound).
    let replicas = e.nodes.len().min(3);
    let mut paths = Vec::new();
    for (i, node) in e.nodes.iter().enumerate() {
        let name = format!("node-{}", i + 1);
        let store = abs.join("data").join(&name);
        std::fs::create_dir_all(&store)?;
        let monitor = if node.monitor_port == 0 {
            String::new()
        } else {
            format!("http: \"{}:{}\"\n", node.host, node.monitor_port)
        };
        let conf = format!(
            "# NATS node {name} of coevo fleet {fleet} — generated by `coevo fleet export-nats`.\n\
             # Run: nats-server -c {path}\n\
             server_name: \"{name}\"\n\
             listen: \"{host}:{client}\"\n\
             {monitor}\
             # Model chunks are <= 256 KiB; leave headroom for the envelope (as Mosquitto's 2 MiB).\n\
             max_payload: 2MB\n\
             jetstream {{\n  store_dir: \"{store}\"\n}}\n\
             cluster {{\n  name: \"{cluster}\"\n  listen: \"{host}:{cport}\"\n  routes: [{routes}]\n}}\n\
             mqtt {{\n  listen: \"{host}:{mqtt}\"\n\
             \x20 # Sessions, retained messages and QoS 1 deliveries survive the loss of a node.\n\
             \x20 stream_replicas: {replicas}\n\
             \x20 # A coordinator acknowledges a delta once it is on disk; re-deliver after this.\n\
             \x20 ack_wait: \"60s\"\n\
             \x20 # QoS 1 messages in flight per subscription (the coordinator's deltas filter).\n\
             \x20 max_ack_pending: 10000\n}}\n\
             include \"users.conf\"\n",
            fleet = e.fleet,
            path = abs.join(format!("{name}.conf")).display(),
            host = node.host,
            client = node.client_port,
            store = store.display(),
            cluster = e.cluster_name,
            cport = node.cluster_port,
            routes = routes.join(", "),
            mqtt = node.mqtt_port,
        );
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// An MQTT topic filter as the NATS subject(s) it covers: `/` → `.`, `+` → `*`, and `x/#` → both
/// `x` and `x.>` (MQTT's `#` also matches its parent level; NATS' `>` does not).
pub fn mqtt_filter_to_subjects(filter: &str) -> Result<Vec<String>> {
    if filter.contains('.') || filter.contains(' ') {
        bail!(
            "topic filter {filter:?} holds a '.' or a space, which NATS 2.9's MQTT gateway \
             refuses; use ids without dots"
        );
    }
    let levels: Vec<&str> = filter.split('/').collect();
    if levels.iter().any(|l| l.is_empty()) {
        bail!("topic filter {filter:?} has an empty level");
    }
    let subject = |ls: &[&str]| -> String {
        ls.iter()
            .map(|l| match *l {
                "+" => "*",
                "#" => ">",
                l => l,
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    Ok(match levels.split_last() {
        Some((&"#", parent)) if !parent.is_empty() => vec![subject(parent), subject(&levels)],
        _ => vec![subject(&levels)],
    })
}

/// The `users.conf` of the fleet: the coordinator and every registered client, each with the
/// embedded broker's read/write rules as NATS permissions.
pub fn users_conf(e: &Export<'_>) -> Result<String> {
    let rules = crate::mosquitto::fleet_rules(e.fleet, e.coordinator_id)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# coevo fleet {} — generated by `coevo fleet export-nats`. One user per client id;\n\
         # permissions are the embedded broker's ACL. $MQTT.sub.> is the server's internal\n\
         # delivery subject every QoS 1 subscriber needs; users are MQTT-only, so it can't be\n\
         # subscribed to directly.\nauthorization {{\n  users: [",
        e.fleet
    );
    let quote = |subjects: Vec<String>| -> String {
        subjects
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ids =
        std::iter::once(e.coordinator_id).chain(e.registry.clients.keys().map(String::as_str));
    for id in ids {
        if id.contains('.') {
            bail!(
                "client id {id:?} contains '.', which NATS 2.9 refuses in MQTT topics; \
                 NATS cannot carry this fleet as provisioned"
            );
        }
        let Some(hash) = e.credentials.nats.get(id) else {
            bail!(
                "{id} has no NATS (bcrypt) password hash in the credential file; \
                 set its password again with `coevo fleet password {id}` (credential files \
                 written before NATS export existed have none)"
            );
        };
        let mut publish = Vec::new();
        for f in rules.write_filters(id) {
            publish.extend(mqtt_filter_to_subjects(&f)?);
        }
        let mut subscribe = vec!["$MQTT.sub.>".to_owned()];
        for f in rules.read_filters(id) {
            subscribe.extend(mqtt_filter_to_subjects(&f)?);
        }
        let _ = writeln!(
            out,
            "    {{user: \"{id}\", password: \"{hash}\", allowed_connection_types: [\"MQTT\"], \
             permissions: {{publish: [{}], subscribe: [{}]}}}}",
            quote(publish),
            quote(subscribe),
        );
    }
    out.push_str("  ]\n}\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_map_to_the_subjects_nats_checks() {
        assert_eq!(
            mqtt_filter_to_subjects("coevo/v1/f/delta/cam-1/#").unwrap(),
            ["coevo.v1.f.delta.cam-1", "coevo.v1.f.delta.cam-1.>"]
        );
        assert_eq!(
            mqtt_filter_to_subjects("coevo/v1/f/model/+/+").unwrap(),
            ["coevo.v1.f.model.*.*"]
        );
        assert_eq!(
            mqtt_filter_to_subjects("coevo/v1/f/round/current").unwrap(),
            ["coevo.v1.f.round.current"]
        );
        assert!(mqtt_filter_to_subjects("coevo/v1/f/cam.1").is_err());
        assert!(mqtt_filter_to_subjects("coevo//x").is_err());
    }

    #[test]
    fn one_box_nodes_take_consecutive_ports_and_hosts_share_them() {
        let one = plan_nodes(&[], 3, 1883, 4222, 6222, 0).unwrap();
        assert_eq!(one.len(), 3);
        assert_eq!(one[2].mqtt_port, 1885);
        assert_eq!(one[2].cluster_port, 6224);
        assert_eq!(one[2].monitor_port, 0);
        let hosts = vec!["10.0.0.1".to_string(), "10.0.0.2".to_string()];
        let many = plan_nodes(&hosts, 3, 1883, 4222, 6222, 8222).unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[1].host, "10.0.0.2");
        assert_eq!(many[1].mqtt_port, 1883);
    }

    #[test]
    fn users_get_the_embedded_acl_and_no_plaintext() {
        let mut registry = FleetRegistry::default();
        let pk = coevo_protocol::SigningKey::generate().unwrap().public_key();
        registry.add("cam-1", &pk).unwrap();
        let mut creds = Credentials::default();
        creds.set_device_secret("cam-1", &"s".repeat(24)).unwrap();
        creds.set_device_secret("coord", &"t".repeat(24)).unwrap();
        let e = Export {
            fleet: "f",
            coordinator_id: "coord",
            registry: &registry,
            credentials: &creds,
            nodes: plan_nodes(&[], 3, 1883, 4222, 6222, 0).unwrap(),
            cluster_name: "coevo",
        };
        let users = users_conf(&e).unwrap();
        assert!(
            !users.contains(&"s".repeat(24)),
            "plaintext secret in users.conf"
        );
        let cam = users.lines().find(|l| l.contains("\"cam-1\"")).unwrap();
        assert!(cam.contains("publish: [\"coevo.v1.f.delta.cam-1\", \"coevo.v1.f.delta.cam-1.>\", \"coevo.v1.f.status.cam-1\"]"), "{cam}");
        assert!(cam.contains("\"coevo.v1.f.receipt.cam-1\""), "{cam}");
        assert!(
            !cam.contains("receipt.*") && !cam.contains("delta.*"),
            "{cam}"
        );
        let coord = users.lines().find(|l| l.contains("\"coord\"")).unwrap();
        assert!(coord.contains("\"coevo.v1.f.>\""), "{coord}");

        // A credential file without NATS hashes (written before they existed) is refused
        // with the fix in the message, not exported with a hole.
        let mut old = creds.clone();
        old.nats.clear();
        let e = Export {
            credentials: &old,
            ..e
        };
        let err = users_conf(&e).unwrap_err().to_string();
        assert!(err.contains("coevo fleet password"), "{err}");
    }
}
