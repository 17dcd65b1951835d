//! Topic ACLs: the one rule set behind both the embedded broker's front end and the exported
//! Mosquitto `acl_file`, so the two brokers can never disagree about who may read or write what.
//!
//! The fleet's topic tree is `{topic_root}/{fleet}/…` (DESIGN §4). Two roles:
//!
//! - **coordinator** accounts (`[acl] coordinators`, default `["coordinator"]`; collectors too):
//!   read and write everything under `{topic_root}/`, nothing outside it;
//! - **cameras** (every other authenticated client): read only `{fleet}/round/current`,
//!   `{fleet}/model/+/+` and their own `{fleet}/receipt/{self}` (or narrower filters inside
//!   those); write only `{fleet}/delta/{self}/…` and `{fleet}/status/{self}` (their last will
//!   too). So a camera can neither read another camera's delta nor forge the manifest, a model
//!   chunk, a receipt or a report (retained or not).
//!
//! The embedded broker does not know the fleet name, so there the fleet level is a single-level
//! wildcard (`+`): a camera's rights are the same in every fleet under the root, and they are
//! always tied to its own id. The Mosquitto export names the fleet.
//!
//! Everything here is a pure function over strings. A subscription is allowed only if *every*
//! topic its filter can match is allowed ("coverage", not overlap), so `#`, `+/#` or
//! `coevo/v1/+/delta/#` are refused for cameras even though they overlap allowed topics.
//! A client id that is not a single literal topic level (contains `/`, `+`, `#` or NUL, or is
//! empty) gets no rights at all: it would otherwise turn into a wildcard inside its own rules.

use serde::{Deserialize, Serialize};

use crate::BrokerError;

/// Prefix of a shared subscription (`$share/{group}/{filter}`), used by scale-out collectors.
const SHARE_PREFIX: &str = "$share/";

/// `[acl]` in the broker config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Root of every coevo topic; the fleet name is the next level. Default `coevo/v1` (the
    /// protocol's root).
    pub topic_root: String,
    /// Client ids with the coordinator role: read and write everything under `topic_root`.
    /// Default `["coordinator"]` (the coordinator's default client id). Every other client is
    /// a camera.
    pub coordinators: Vec<String>,
}

impl Default for AclConfig {
    fn default() -> Self {
        Self {
            topic_root: "coevo/v1".to_owned(),
            coordinators: vec!["coordinator".to_owned()],
        }
    }
}

impl AclConfig {
    /// The root must be a plain topic (no wildcards, no `$`), coordinator ids single levels.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let root_ok = !self.topic_root.is_empty()
            && !self.topic_root.starts_with('$')
            && !self.topic_root.starts_with('/')
            && !self.topic_root.ends_with('/')
            && self.topic_root.split('/').all(is_literal_level);
        if !root_ok {
            return Err(BrokerError::Config(format!(
                "acl.topic_root {:?} must be a topic without wildcards, `$` or empty levels",
                self.topic_root
            )));
        }
        if let Some(bad) = self.coordinators.iter().find(|c| !is_literal_level(c)) {
            return Err(BrokerError::Config(format!(
                "acl.coordinators: {bad:?} is not a valid client id (no `/`, `+`, `#`, empty)"
            )));
        }
        Ok(())
    }
}

/// A client's role under the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything under the root.
    Coordinator,
    /// Its own delta and status; the round, the models and its own receipt.
    Camera,
    /// An id that cannot be a topic level: no rights.
    Invalid,
}

/// The compiled rule set for one fleet scope.
#[derive(Clone, Debug)]
pub struct Acl {
    root: String,
    /// `{root}/{fleet}` or `{root}/+`.
    scope: String,
    coordinators: Vec<String>,
}

impl Acl {
    /// Rules for every fleet under the root (the embedded broker).
    pub fn any_fleet(config: &AclConfig) -> Self {
        Self::with_scope(config, "+")
    }

    /// Rules for one fleet (the Mosquitto export). `fleet` must be a single literal level.
    pub fn for_fleet(config: &AclConfig, fleet: &str) -> Result<Self, BrokerError> {
        if !is_literal_level(fleet) {
            return Err(BrokerError::Config(format!(
                "fleet {fleet:?} is not a single topic level"
            )));
        }
        Ok(Self::with_scope(config, fleet))
    }

    fn with_scope(config: &AclConfig, fleet: &str) -> Self {
        Self {
            root: config.topic_root.clone(),
            scope: format!("{}/{fleet}", config.topic_root),
            coordinators: config.coordinators.clone(),
        }
    }

    /// The role of an (authenticated) client id.
    pub fn role(&self, client_id: &str) -> Role {
        if !is_literal_level(client_id) {
            Role::Invalid
        } else if self.coordinators.iter().any(|c| c == client_id) {
            Role::Coordinator
        } else {
            Role::Camera
        }
    }

    /// Filters `client_id` may subscribe to (or to narrower filters inside them).
    pub fn read_filters(&self, client_id: &str) -> Vec<String> {
        match self.role(client_id) {
            Role::Coordinator => vec![format!("{}/#", self.coordinator_base())],
            Role::Camera => vec![
                format!("{}/round/current", self.scope),
                format!("{}/model/+/+", self.scope),
                format!("{}/receipt/{client_id}", self.scope),
            ],
            Role::Invalid => Vec::new(),
        }
    }

    /// Filters matching every topic `client_id` may publish to.
    pub fn write_filters(&self, client_id: &str) -> Vec<String> {
        match self.role(client_id) {
            Role::Coordinator => vec![format!("{}/#", self.coordinator_base())],
            Role::Camera => vec![
                format!("{}/delta/{client_id}/#", self.scope),
                format!("{}/status/{client_id}", self.scope),
            ],
            Role::Invalid => Vec::new(),
        }
    }

    /// The coordinator's territory: the whole root for the embedded broker, the fleet for an
    /// export that names one.
    fn coordinator_base(&self) -> &str {
        if self.scope.ends_with("/+") {
            &self.root
        } else {
            &self.scope
        }
    }

    /// May `client_id` publish on `topic`? A topic with wildcards or that is empty never is.
    pub fn may_publish(&self, client_id: &str, topic: &str) -> bool {
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return false;
        }
        self.write_filters(client_id)
            .iter()
            .any(|allowed| covers(allowed, topic))
    }

    /// May `client_id` subscribe to `filter`? Only if every topic `filter` can match is
    /// readable. Shared subscriptions (`$share/{group}/{filter}`) are judged by their filter,
    /// and only coordinator accounts may use them.
    pub fn may_subscribe(&self, client_id: &str, filter: &str) -> bool {
        let role = self.role(client_id);
        let filter = match filter.strip_prefix(SHARE_PREFIX) {
            Some(rest) => {
                let Some((group, inner)) = rest.split_once('/') else {
                    return false;
                };
                if role != Role::Coordinator || !is_literal_level(group) {
                    return false;
                }
                inner
            }
            None => filter,
        };
        if !is_valid_filter(filter) {
            return false;
        }
        self.read_filters(client_id)
            .iter()
            .any(|allowed| covers(allowed, filter))
    }
}

/// A topic level that is a plain name: non-empty and free of `/`, `+`, `#` and NUL.
pub fn is_literal_level(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#', '\0'])
}

/// MQTT 3.1.1 §4.7 filter syntax: non-empty, `#` only as the whole last level, `+` only as a
/// whole level, no NUL.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Does `allowed` match every topic that `filter` matches? With a topic (no wildcards) as
/// `filter` this is plain MQTT topic matching.
pub fn covers(allowed: &str, filter: &str) -> bool {
    let a: Vec<&str> = allowed.split('/').collect();
    let f: Vec<&str> = filter.split('/').collect();
    covers_levels(&a, &f)
}

fn covers_levels(a: &[&str], f: &[&str]) -> bool {
    match (a.split_first(), f.split_first()) {
        // `x/#` matches `x` and everything below it, whatever `filter` asks for there.
        (Some((&"#", _)), _) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some((&"+", a_rest)), Some((&level, f_rest))) => {
            level != "#" && covers_levels(a_rest, f_rest)
        }
        (Some((&a_level, a_rest)), Some((&f_level, f_rest))) => {
            a_level == f_level && covers_levels(a_rest, f_rest)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> Acl {
        Acl::any_fleet(&AclConfig::default())
    }

    #[test]
    fn camera_reads_only_round_models_and_own_receipt() {
        let a = acl();
        for ok in [
            "coevo/v1/city/round/current",
            "coevo/v1/+/round/current",
            "coevo/v1/city/model/abc/0",
            "coevo/v1/city/model/abc/+",
            "coevo/v1/city/model/+/+",
            "coevo/v1/city/receipt/cam-1",
        ] {
            assert!(a.may_subscribe("cam-1", ok), "{ok}");
        }
        for refused in [
            "#",
            "+/#",
            "$SYS/#",
            "coevo/#",
            "coevo/v1/#",
            "coevo/v1/city/#",
            "coevo/v1/+/cam-2/#",
            "coevo/v1/city/delta/+/+/+",
            "coevo/v1/city/delta/cam-2/1/0",
            "coevo/v1/city/delta/cam-1/1/0",
            "coevo/v1/city/receipt/cam-2",
            "coevo/v1/city/receipt/+",
            "coevo/v1/city/status/cam-1",
            "coevo/v1/city/status/+",
            "coevo/v1/city/report/1",
            "coevo/v1/city/model/#",
            "coevo/v1/city/model/abc/#",
            "coevo/v1/city/model/abc/0/extra",
            "coevo/v1/city/round/+",
            "coevo/v1/city/round/current/#",
            "coevo/v1/city/round/current/x",
            "$share/g/coevo/v1/city/round/current",
            "coevo/v1/city/model/ab+/0",
            "coevo/v1/city/model/abc/0#",
            "",
            "coevo/v1/city/round/current\0",
        ] {
            assert!(!a.may_subscribe("cam-1", refused), "{refused:?}");
        }
    }

    #[test]
    fn camera_writes_only_own_delta_and_status() {
        let a = acl();
        for ok in [
            "coevo/v1/city/delta/cam-1/3/0",
            "coevo/v1/city/delta/cam-1",
            "coevo/v1/city/status/cam-1",
        ] {
            assert!(a.may_publish("cam-1", ok), "{ok}");
        }
        for refused in [
            "coevo/v1/city/delta/cam-2/3/0",
            "coevo/v1/city/delta/cam-10/3/0",
            "coevo/v1/city/status/cam-2",
            "coevo/v1/city/status/cam-1/x",
            "coevo/v1/city/round/current",
            "coevo/v1/city/model/abc/0",
            "coevo/v1/city/receipt/cam-1",
            "coevo/v1/city/report/1",
            "coevo/v1/city/delta/+/3/0",
            "coevo/v1/city/delta/cam-1/#",
            "coevo/v1/+/delta/cam-1/3/0",
            "elsewhere/delta/cam-1/3/0",
            "$SYS/broker",
            "",
        ] {
            assert!(!a.may_publish("cam-1", refused), "{refused:?}");
        }
    }

    #[test]
    fn coordinator_has_the_root_and_nothing_else() {
        let a = acl();
        assert_eq!(a.role("coordinator"), Role::Coordinator);
        assert!(a.may_subscribe("coordinator", "coevo/v1/city/delta/+/+/+"));
        assert!(a.may_subscribe("coordinator", "coevo/v1/#"));
        assert!(a.may_subscribe("coordinator", "$share/collectors/coevo/v1/city/delta/+/+/+"));
        assert!(a.may_publish("coordinator", "coevo/v1/city/round/current"));
        assert!(a.may_publish("coordinator", "coevo/v1/city/receipt/cam-1"));
        assert!(!a.may_subscribe("coordinator", "#"));
        assert!(!a.may_subscribe("coordinator", "$SYS/#"));
        assert!(!a.may_subscribe("coordinator", "+/v1/#"));
        assert!(!a.may_publish("coordinator", "other/topic"));
        assert!(!a.may_publish("coordinator", "coevo/v1/city/round/+"));
    }

    #[test]
    fn ids_that_are_not_a_topic_level_get_nothing() {
        let a = acl();
        for id in ["+", "#", "cam/1", "cam+", "", "a\0"] {
            assert_eq!(a.role(id), Role::Invalid, "{id:?}");
            assert!(a.read_filters(id).is_empty());
            assert!(!a.may_publish(id, "coevo/v1/city/delta/+/1/0"));
            assert!(!a.may_publish(id, &format!("coevo/v1/city/delta/{id}/1/0")));
            assert!(!a.may_subscribe(id, &format!("coevo/v1/city/receipt/{id}")));
            assert!(!a.may_subscribe(id, "coevo/v1/city/round/current"));
        }
    }

    #[test]
    fn fleet_scope_pins_the_fleet() {
        let a = Acl::for_fleet(&AclConfig::default(), "city").unwrap();
        assert_eq!(
            a.read_filters("cam-1"),
            [
                "coevo/v1/city/round/current",
                "coevo/v1/city/model/+/+",
                "coevo/v1/city/receipt/cam-1"
            ]
        );
        assert_eq!(a.write_filters("coordinator"), ["coevo/v1/city/#"]);
        assert!(!a.may_subscribe("cam-1", "coevo/v1/other/round/current"));
        assert!(!a.may_publish("cam-1", "coevo/v1/other/delta/cam-1/1/0"));
        assert!(Acl::for_fleet(&AclConfig::default(), "a/b").is_err());
    }

    #[test]
    fn coverage_and_filter_syntax() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/b/#"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(is_valid_filter("a/+/#"));
        assert!(!is_valid_filter("a/#/b"));
        assert!(!is_valid_filter("a/b#"));
        assert!(!is_valid_filter("a/+b"));
    }

    #[test]
    fn config_validation() {
        assert!(AclConfig::default().validate().is_ok());
        for root in ["", "coevo/+", "$SYS", "coevo/v1/", "coevo//v1", "#"] {
            let c = AclConfig {
                topic_root: root.into(),
                ..AclConfig::default()
            };
            assert!(c.validate().is_err(), "{root:?}");
        }
        let c = AclConfig {
            coordinators: vec!["coord+".into()],
            ..AclConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
