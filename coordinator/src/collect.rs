//! The collect phase's decisions, kept pure so each is unit-tested: which incoming delta chunk
//! may hold state ([`admit`]), how rejections are counted and attributed ([`RejectionTally`]),
//! and what a restarted coordinator finds of the deltas it acknowledged ([`recover`]).
//!
//! Attribution: the sender of a chunk is the client id in its topic (`delta/{client}/…`). With
//! the broker's topic ACLs only that client can publish there; without them anyone can. So every
//! rejection says whether it was *signed* (proven to be the client's) or failed before any
//! signature check, and a rejection never stops a later honest delta from being accepted.

use crate::ingest::AcceptedMeta;
use crate::report::{LostDelta, RejectionCount};
use crate::store::{JournalEntry, Store};
use crate::verify::{verify_upload, RoundContext};
use crate::CoordinatorError;
use coevo_protocol::{digest, DeltaChunk};
use std::collections::{BTreeMap, BTreeSet};

/// What to do with a delta chunk, decided from its topic alone, before anything is decoded
/// or stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// For the open round, from a registered client still owed a receipt: reassemble it.
    Take,
    /// The client's delta is already accepted this round: a re-send. Only chunk 0 (which holds
    /// the signed header, hence the digest) is looked at, to send the receipt again.
    Resend,
    /// For a round that has closed: a retry or a replay. Counted as late, never held.
    Late,
    /// For a round not opened yet: no manifest exists for it, so no honest client sends it.
    Future,
    /// The id is not in the fleet registry.
    UnknownClient,
}

/// Decides, from the topic's client and round, whether a chunk may hold any state.
pub fn admit(round: u64, open: u64, registered: bool, accepted: bool) -> Admission {
    if !registered {
        Admission::UnknownClient
    } else if round < open {
        Admission::Late
    } else if round > open {
        Admission::Future
    } else if accepted {
        Admission::Resend
    } else {
        Admission::Take
    }
}

/// Distinct unregistered ids counted separately per round; beyond this, they share one entry,
/// so made-up ids cannot grow the report (or the coordinator's memory) without bound.
pub const MAX_UNREGISTERED_IDS: usize = 32;
/// The client name unregistered ids beyond [`MAX_UNREGISTERED_IDS`] are counted under.
pub const OTHER_UNREGISTERED: &str = "(other unregistered ids)";

/// Rejections of one round, counted per (client, reason code, signed): a flood of a million
/// bad chunks is one entry with a count, one log line and at most one receipt.
#[derive(Debug, Default)]
pub struct RejectionTally {
    entries: BTreeMap<(String, String, bool), RejectionCount>,
    unregistered: BTreeSet<String>,
}

impl RejectionTally {
    /// Counts one rejected message. `reason` is the full text; its stable code (before the
    /// first `:`) is what entries are keyed on. Returns true for the first of its kind this
    /// round: the one message worth a log line and a receipt.
    pub fn record(&mut self, client: &str, registered: bool, reason: &str, signed: bool) -> bool {
        let client = if registered
            || self.unregistered.contains(client)
            || self.unregistered.len() < MAX_UNREGISTERED_IDS
        {
            if !registered {
                self.unregistered.insert(client.to_string());
            }
            client
        } else {
            OTHER_UNREGISTERED
        };
        let code = reason
            .split(':')
            .next()
            .unwrap_or(reason)
            .trim()
            .to_string();
        let key = (client.to_string(), code, signed);
        match self.entries.get_mut(&key) {
            Some(e) => {
                e.count += 1;
                false
            }
            None => {
                self.entries.insert(
                    key,
                    RejectionCount {
                        client: client.to_string(),
                        reason: reason.to_string(),
                        count: 1,
                        signed,
                    },
                );
                true
            }
        }
    }

    /// The entries, sorted by client, reason code and signedness.
    pub fn counts(&self) -> Vec<RejectionCount> {
        self.entries.values().cloned().collect()
    }

    /// Messages counted over all entries.
    pub fn total(&self) -> u64 {
        self.entries.values().map(|e| e.count).sum()
    }
}

/// A delta read back from disk after a restart, verified again against the round. Only its
/// metadata is kept (the delta stays on disk), so recovering 10,000 deltas costs no more memory
/// than one.
pub struct Recovered {
    pub client: String,
    pub meta: AcceptedMeta,
}

/// Reads back the deltas of `ctx.round` a previous run accepted. Each journal entry (a receipt
/// that went out) must have its file, intact and with the digest the receipt named; one that
/// hasn't is returned as lost, by name. A delta file without a journal entry (a crash between
/// writing it and journalling it: no receipt was sent) is taken if it verifies, and journalled.
pub fn recover(
    store: &Store,
    ctx: &RoundContext<'_>,
    limit: usize,
) -> Result<(Vec<Recovered>, Vec<LostDelta>), CoordinatorError> {
    let round = ctx.round;
    let mut promised: BTreeMap<String, JournalEntry> = BTreeMap::new();
    for e in store.load_journal(round)? {
        if coevo_protocol::topic::validate_id(&e.client).is_ok() {
            promised.insert(e.client.clone(), e);
        }
    }
    let read = |client: &str| -> Result<(AcceptedMeta, String), String> {
        let path = store.delta_dir(round).join(format!("{client}.bin"));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("missing: {} does not exist", path.display()))
            }
            Err(e) => return Err(format!("missing: {}: {e}", path.display())),
        };
        let rec: DeltaChunk =
            coevo_protocol::envelope::decode(&bytes, coevo_protocol::Kind::DeltaChunk, limit)
                .map_err(|e| format!("corrupt: {}: {e}", path.display()))?;
        if rec.client != client {
            return Err(format!(
                "corrupt: {} holds client {}",
                path.display(),
                rec.client
            ));
        }
        let v = verify_upload(ctx, client, rec.header.as_ref(), &rec.data)
            .map_err(|e| format!("corrupt: {}: {e}", path.display()))?;
        let meta = AcceptedMeta {
            norm: v.delta.l2_norm(),
            header: v.header,
            bytes: rec.data.len() as u64,
        };
        Ok((meta, digest(&rec.data).to_string()))
    };
    let mut recovered = Vec::new();
    let mut lost = Vec::new();
    for (client, entry) in &promised {
        match read(client) {
            Ok((meta, d)) if d == entry.digest => recovered.push(Recovered {
                client: client.clone(),
                meta,
            }),
            Ok((_, d)) => lost.push(LostDelta {
                client: client.clone(),
                round,
                digest: entry.digest.clone(),
                reason: format!("corrupt: the stored delta has digest {d}"),
            }),
            Err(reason) => lost.push(LostDelta {
                client: client.clone(),
                round,
                digest: entry.digest.clone(),
                reason,
            }),
        }
    }
    // Files nobody was promised: accepted but not yet journalled when the coordinator stopped.
    let unjournalled: Vec<String> = match std::fs::read_dir(store.delta_dir(round)) {
        Ok(d) => d
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                (p.extension().and_then(|x| x.to_str()) == Some("bin"))
                    .then(|| p.file_stem().and_then(|s| s.to_str()).map(str::to_string))
                    .flatten()
            })
            .filter(|c| !promised.contains_key(c))
            .filter(|c| coevo_protocol::topic::validate_id(c).is_ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    for client in unjournalled {
        if let Ok((meta, d)) = read(&client) {
            store.append_journal(&JournalEntry {
                client: client.clone(),
                round,
                digest: d,
                file: Store::delta_file(&client),
            })?;
            recovered.push(Recovered { client, meta });
        }
    }
    recovered.sort_by(|a, b| a.client.cmp(&b.client));
    Ok((recovered, lost))
}

/// The (client, payload digest) pairs acknowledged in `round`, from its journal: lets a
/// retry of a closed round's delta be answered with its receipt again instead of blamed.
pub fn acknowledged(
    store: &Store,
    round: u64,
) -> Result<BTreeSet<(String, String)>, CoordinatorError> {
    Ok(store
        .load_journal(round)?
        .into_iter()
        .map(|e| (e.client, e.digest))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::FleetRegistry;
    use coevo_models::{ParamTensor, Weights};
    use coevo_protocol::envelope::Kind;
    use coevo_protocol::{DeltaHeader, LocalMetrics, Signed, SigningKey, UplinkCodec};

    /// Three registered clients and a one-tensor model.
    fn fleet() -> (FleetRegistry, Vec<SigningKey>, Weights) {
        let mut registry = FleetRegistry::default();
        let keys: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate().unwrap()).collect();
        for (i, k) in keys.iter().enumerate() {
            registry.add(&format!("cam-{i}"), &k.public_key()).unwrap();
        }
        let mut layout = Weights::default();
        layout.tensors.insert(
            "w".into(),
            ParamTensor {
                shape: vec![2, 3],
                data: vec![0.0; 6],
            },
        );
        (registry, keys, layout)
    }

    /// Stores cam-`i`'s valid delta for `ctx`'s round as the server does; journalled or not.
    fn accept(store: &Store, ctx: &RoundContext<'_>, key: &SigningKey, i: usize, journal: bool) {
        let client = format!("cam-{i}");
        let mut w = ctx.layout.clone();
        w.tensors.values_mut().for_each(|t| t.data.fill(i as f32));
        let payload = UplinkCodec::F32.encode(&w.to_named()).unwrap();
        let h = DeltaHeader {
            fleet: ctx.fleet.into(),
            round: ctx.round,
            client: client.clone(),
            base_digest: ctx.base_digest,
            samples: 10,
            metrics: LocalMetrics::default(),
            codec: UplinkCodec::F32,
            payload_digest: digest(&payload),
            payload_len: payload.len() as u64,
            chunks: 1,
        };
        let signed = Signed::sign(Kind::DeltaHeader, &h, &client, key);
        store
            .save_delta(ctx.round, &client, &signed, &payload)
            .unwrap();
        if journal {
            store
                .append_journal(&JournalEntry {
                    client: client.clone(),
                    round: ctx.round,
                    digest: digest(&payload).to_string(),
                    file: Store::delta_file(&client),
                })
                .unwrap();
        }
    }

    #[test]
    fn recover_names_missing_and_corrupt_acknowledged_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let (registry, keys, layout) = fleet();
        let ctx = RoundContext {
            fleet: "city",
            round: 3,
            base_digest: digest(b"base"),
            uplink_codec: UplinkCodec::F32,
            max_delta_bytes: 1 << 20,
            layout: &layout,
            registry: &registry,
        };
        accept(&store, &ctx, &keys[0], 0, true);
        accept(&store, &ctx, &keys[1], 1, true);
        accept(&store, &ctx, &keys[2], 2, false);
        // cam-1's acknowledged file disappears; cam-2's was written but never journalled.
        std::fs::remove_file(store.delta_dir(3).join("cam-1.bin")).unwrap();
        let (got, lost) = recover(&store, &ctx, 1 << 20).unwrap();
        let names: Vec<&str> = got.iter().map(|r| r.client.as_str()).collect();
        assert_eq!(names, ["cam-0", "cam-2"]);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].client, "cam-1");
        assert!(lost[0].reason.starts_with("missing"), "{:?}", lost[0]);
        // cam-2 is journalled now, so a later loss of its file is named too.
        assert_eq!(store.load_journal(3).unwrap().len(), 3);

        // A damaged file is named as corrupt, not silently skipped.
        let p = store.delta_dir(3).join("cam-0.bin");
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        std::fs::write(&p, bytes).unwrap();
        let (got, lost) = recover(&store, &ctx, 1 << 20).unwrap();
        assert_eq!(got.len(), 1);
        let mut lost: Vec<(String, String)> = lost
            .into_iter()
            .map(|l| (l.client, l.reason.split(':').next().unwrap().to_string()))
            .collect();
        lost.sort();
        assert_eq!(
            lost,
            [
                ("cam-0".to_string(), "corrupt".to_string()),
                ("cam-1".to_string(), "missing".to_string())
            ]
        );
        // The previous round's acknowledgements, for answering late retries.
        assert_eq!(acknowledged(&store, 3).unwrap().len(), 3);
        assert!(acknowledged(&store, 2).unwrap().is_empty());
    }

    #[test]
    fn admit_holds_state_only_for_the_open_round_of_registered_clients() {
        assert_eq!(admit(5, 5, true, false), Admission::Take);
        assert_eq!(admit(5, 5, true, true), Admission::Resend);
        assert_eq!(admit(4, 5, true, false), Admission::Late);
        assert_eq!(admit(0, 5, true, true), Admission::Late);
        assert_eq!(admit(6, 5, true, false), Admission::Future);
        assert_eq!(admit(u64::MAX, 5, true, false), Admission::Future);
        assert_eq!(admit(5, 5, false, false), Admission::UnknownClient);
    }

    #[test]
    fn a_flood_is_one_entry_per_client_and_reason() {
        let mut t = RejectionTally::default();
        assert!(t.record(
            "cam-1",
            true,
            "wrong-round: delta for round 7, current round 2",
            false
        ));
        for r in 8..1000 {
            let text = format!("wrong-round: delta for round {r}, current round 2");
            assert!(!t.record("cam-1", true, &text, false));
        }
        // Same client, other reason; same reason, signed; other client: new entries.
        assert!(t.record("cam-1", true, "malformed: x", false));
        assert!(t.record(
            "cam-1",
            true,
            "wrong-round: delta for round 1, current round 2",
            true
        ));
        assert!(t.record("cam-2", true, "malformed: y", false));
        let c = t.counts();
        assert_eq!(c.len(), 4);
        let flood = c
            .iter()
            .find(|e| e.client == "cam-1" && e.reason.starts_with("wrong-round") && !e.signed)
            .unwrap();
        assert_eq!(flood.count, 993);
        assert!(flood.reason.contains("round 7"), "keeps the first detail");
        assert_eq!(t.total(), 996);
    }

    #[test]
    fn made_up_ids_cannot_grow_the_tally() {
        let mut t = RejectionTally::default();
        for i in 0..10_000 {
            t.record(&format!("ghost-{i}"), false, "unknown-client", false);
        }
        let c = t.counts();
        assert_eq!(c.len(), MAX_UNREGISTERED_IDS + 1);
        let other = c.iter().find(|e| e.client == OTHER_UNREGISTERED).unwrap();
        assert_eq!(other.count, 10_000 - MAX_UNREGISTERED_IDS as u64);
        // A registered client is always named, however many ghosts came first.
        assert!(t.record("cam-1", true, "unknown-client", false));
        assert!(t.counts().iter().any(|e| e.client == "cam-1"));
    }
}
