//! The topic tree, `coevo/v1/{fleet}/…` (DESIGN §4), as an enum: nobody formats topic strings
//! by hand, and a topic that does not parse is refused, not guessed at.

use crate::crypto::Digest;
use std::fmt::Write as _;

/// Topic root shared by every fleet; the version is part of it so v2 fleets can share a broker.
pub const ROOT: &str = "coevo/v1";

/// Longest client or fleet id we accept: ids end up in topics, file names and reports.
pub const MAX_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("invalid id {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadId(String),
    #[error("topic {0:?} is not a coevo topic of this fleet")]
    Foreign(String),
    #[error("malformed topic {0:?}")]
    Malformed(String),
}

/// Checks a fleet or client id: safe in a topic level (no `/ + #`), a file name and a report.
pub fn validate_id(id: &str) -> Result<(), TopicError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TopicError::BadId(id.to_string()))
    }
}

/// One topic of a fleet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Retained, signed [`crate::RoundManifest`] of the round in progress.
    RoundCurrent,
    /// Retained chunk `index` of the model with this digest.
    ModelChunk { digest: Digest, index: u32 },
    /// Chunk `index` of a client's delta for a round.
    DeltaChunk {
        client: String,
        round: u64,
        index: u32,
    },
    /// Coordinator's receipts for one client.
    Receipt { client: String },
    /// Retained online/offline status of a client (also its last will).
    Status { client: String },
    /// Retained JSON summary of a finished round.
    Report { round: u64 },
}

impl Topic {
    /// The full topic string for `fleet`.
    pub fn path(&self, fleet: &str) -> String {
        let mut s = format!("{ROOT}/{fleet}/");
        // Writing to a String cannot fail.
        let _ = match self {
            Topic::RoundCurrent => write!(s, "round/current"),
            Topic::ModelChunk { digest, index } => write!(s, "model/{digest}/{index}"),
            Topic::DeltaChunk {
                client,
                round,
                index,
            } => write!(s, "delta/{client}/{round}/{index}"),
            Topic::Receipt { client } => write!(s, "receipt/{client}"),
            Topic::Status { client } => write!(s, "status/{client}"),
            Topic::Report { round } => write!(s, "report/{round}"),
        };
        s
    }

    /// Filter matching every chunk of one model.
    pub fn model_filter(fleet: &str, digest: &Digest) -> String {
        format!("{ROOT}/{fleet}/model/{digest}/+")
    }

    /// Filter matching every model chunk of the fleet (used to clear stale retained chunks).
    pub fn all_models_filter(fleet: &str) -> String {
        format!("{ROOT}/{fleet}/model/+/+")
    }

    /// Filter matching every delta chunk of every client and round.
    pub fn all_deltas_filter(fleet: &str) -> String {
        format!("{ROOT}/{fleet}/delta/+/+/+")
    }

    /// Filter matching every client status.
    pub fn all_status_filter(fleet: &str) -> String {
        format!("{ROOT}/{fleet}/status/+")
    }

    /// Parses a topic of `fleet`; anything else (another fleet, unknown level, bad id or number)
    /// is a typed error.
    pub fn parse(fleet: &str, topic: &str) -> Result<Topic, TopicError> {
        let rest = topic
            .strip_prefix(ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_prefix(fleet))
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::Foreign(topic.to_string()))?;
        let bad = || TopicError::Malformed(topic.to_string());
        let parts: Vec<&str> = rest.split('/').collect();
        let id = |s: &str| validate_id(s).map(|_| s.to_string());
        let t = match parts.as_slice() {
            ["round", "current"] => Topic::RoundCurrent,
            ["model", digest, index] => Topic::ModelChunk {
                digest: digest.parse().map_err(|_| bad())?,
                index: index.parse().map_err(|_| bad())?,
            },
            ["delta", client, round, index] => Topic::DeltaChunk {
                client: id(client)?,
                round: round.parse().map_err(|_| bad())?,
                index: index.parse().map_err(|_| bad())?,
            },
            ["receipt", client] => Topic::Receipt {
                client: id(client)?,
            },
            ["status", client] => Topic::Status {
                client: id(client)?,
            },
            ["report", round] => Topic::Report {
                round: round.parse().map_err(|_| bad())?,
            },
            _ => return Err(bad()),
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_every_variant() {
        let d = crate::digest(b"model");
        let all = [
            Topic::RoundCurrent,
            Topic::ModelChunk {
                digest: d,
                index: 3,
            },
            Topic::DeltaChunk {
                client: "cam-7".into(),
                round: 12,
                index: 0,
            },
            Topic::Receipt {
                client: "cam-7".into(),
            },
            Topic::Status {
                client: "cam.7_x".into(),
            },
            Topic::Report { round: 4 },
        ];
        for t in all {
            let p = t.path("city");
            assert!(p.starts_with("coevo/v1/city/"));
            assert_eq!(Topic::parse("city", &p).unwrap(), t);
            assert!(matches!(
                Topic::parse("other", &p),
                Err(TopicError::Foreign(_))
            ));
        }
    }

    #[test]
    fn rejects_bad_topics() {
        for t in [
            "coevo/v1/city/round",
            "coevo/v1/city/delta/a/b/c",
            "coevo/v1/city/delta/a+/1/0",
            "coevo/v1/city/model/xyz/0",
            "coevo/v1/city/receipt/..",
            "coevo/v1/citya/round/current",
            "coevo/v2/city/round/current",
        ] {
            assert!(Topic::parse("city", t).is_err(), "{t}");
        }
        assert!(validate_id("").is_err());
        assert!(validate_id(&"a".repeat(65)).is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id("cam-001").is_ok());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,120}") {
            let _ = Topic::parse("city", &s);
            let _ = Topic::parse("city", &format!("coevo/v1/city/{s}"));
        }
    }
}
