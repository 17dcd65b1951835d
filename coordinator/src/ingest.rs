//! The heavy half of collection, off the MQTT receive loop (issue #13): verifying a complete
//! upload (Ed25519 signature, SHA-256 digest, decoding, finiteness) and writing it to disk run
//! on a worker pool sized to the cores; the receive loop only routes chunks and dispatches.
//!
//! Durability is a *group commit*: a worker writes and fsyncs its delta file under its final
//! name; the loop then makes a whole batch of finished deltas durable at once — one fsync of
//! the round's delta directory (the renames) and one journal append + fsync for all their
//! lines — and only after that sends the batch's receipts and acknowledges their MQTT
//! packets. So a receipt still never names a delta that a crash could lose, but the per-delta
//! cost of the directory and journal fsyncs is shared by everything that finished meanwhile.
//!
//! Memory: a verified delta is decoded (to check it) and dropped; what the round keeps is
//! [`AcceptedMeta`] (header, size, norm). Rules read the deltas back through [`DeltaFiles`],
//! one at a time or in coordinate blocks (see [`crate::strategy::UpdateSource`]).

use crate::registry::FleetRegistry;
use crate::report::CollectReport;
use crate::store::{sync_dir, JournalEntry, Store};
use crate::strategy::{StrategyError, UpdateSource};
use crate::verify::{verify_signer, verify_upload, RoundContext};
use crate::CoordinatorError;
use coevo_models::Weights;
use coevo_protocol::{digest, DeltaChunk, DeltaHeader, Digest, RejectReason, Signed, UplinkCodec};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, Semaphore};

/// What a delta must match this round, owned so worker threads can share it.
pub struct RoundSpec {
    pub fleet: String,
    pub round: u64,
    pub base_digest: Digest,
    pub uplink_codec: UplinkCodec,
    pub max_delta_bytes: u64,
    /// The round's base model: names and shapes every delta must have.
    pub layout: Weights,
    pub registry: FleetRegistry,
}

impl RoundSpec {
    pub fn ctx(&self) -> RoundContext<'_> {
        RoundContext {
            fleet: &self.fleet,
            round: self.round,
            base_digest: self.base_digest,
            uplink_codec: self.uplink_codec,
            max_delta_bytes: self.max_delta_bytes,
            layout: &self.layout,
            registry: &self.registry,
        }
    }
}

/// A reassembled upload, as it came off the topic `delta/{client}/{round}/…`.
#[derive(Clone, Debug)]
pub struct Upload {
    pub client: String,
    /// The round in the topic.
    pub round: u64,
    pub header: Option<Signed>,
    pub payload: Vec<u8>,
}

/// All the round keeps in memory of an accepted delta; the delta itself is on disk.
#[derive(Clone, Debug)]
pub struct AcceptedMeta {
    pub header: DeltaHeader,
    /// Payload bytes.
    pub bytes: u64,
    /// L2 norm of the decoded delta, computed when it was verified.
    pub norm: f64,
}

/// Why an upload was refused, and whether it provably came from its client.
#[derive(Clone, Debug)]
pub struct Refused {
    pub reason: RejectReason,
    /// The header carried the topic client's valid signature.
    pub signed: bool,
    pub digest: Digest,
}

/// Verifies `up` and, if it passes, writes it (file fsync'd and renamed into the round's delta
/// directory; the directory itself is synced by [`commit`]). Pure CPU plus one file write: runs
/// on a worker thread. `Err` only for I/O failures of the coordinator's own disk.
pub fn verify_and_write(
    spec: &RoundSpec,
    store: &Store,
    up: &Upload,
) -> Result<Result<AcceptedMeta, Refused>, CoordinatorError> {
    let ctx = spec.ctx();
    match verify_upload(&ctx, &up.client, up.header.as_ref(), &up.payload) {
        Ok(v) => {
            let Some(signed) = up.header.as_ref() else {
                // verify_upload refuses a missing header; unreachable in practice.
                return Ok(Err(Refused {
                    reason: RejectReason::Malformed("upload without a header".into()),
                    signed: false,
                    digest: digest(&up.payload),
                }));
            };
            let norm = v.delta.l2_norm();
            drop(v.delta);
            store.write_delta(spec.round, &up.client, signed, &up.payload)?;
            Ok(Ok(AcceptedMeta {
                header: v.header,
                bytes: up.payload.len() as u64,
                norm,
            }))
        }
        Err(reason) => {
            // Whether the header is provably the client's: decides whether the rejection is
            // signed (proven theirs) or could have been sent by anyone on their topic.
            let signed = up
                .header
                .as_ref()
                .is_some_and(|h| verify_signer(&spec.registry, &up.client, h).is_ok());
            Ok(Err(Refused {
                reason,
                signed,
                digest: digest(&up.payload),
            }))
        }
    }
}

/// Makes a batch of written deltas durable and journals them: one fsync of the round's delta
/// directory, one journal append + fsync. Returns the fsyncs made.
pub fn commit(
    store: &Store,
    round: u64,
    batch: &[(String, Digest)],
) -> Result<u64, CoordinatorError> {
    if batch.is_empty() {
        return Ok(0);
    }
    sync_dir(&store.delta_dir(round))?;
    let entries: Vec<JournalEntry> = batch
        .iter()
        .map(|(client, d)| JournalEntry {
            client: client.clone(),
            round,
            digest: d.to_string(),
            file: Store::delta_file(client),
        })
        .collect();
    store.append_journal_batch(round, &entries)?;
    Ok(2)
}

/// One finished verification, handed back to the receive loop.
pub struct Done {
    /// The caller's token for this upload (e.g. which MQTT packet to acknowledge).
    pub ticket: u64,
    pub upload: UploadId,
    pub outcome: Result<Result<AcceptedMeta, Refused>, CoordinatorError>,
}

/// Who sent a finished upload (its payload is gone by then).
#[derive(Clone, Debug)]
pub struct UploadId {
    pub client: String,
    pub round: u64,
}

/// The worker pool: at most `workers` verifications at once, on tokio's blocking threads;
/// results come back on a channel in completion order.
pub struct Ingest {
    spec: Arc<RoundSpec>,
    store: Store,
    slots: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<(Done, u64)>,
    rx: mpsc::UnboundedReceiver<(Done, u64)>,
    in_flight: usize,
    /// Worker time in µs (summed exactly; `stats.verify_ms` is derived from it, so sub-ms
    /// verifications are not truncated to 0 one by one).
    verify_us: u64,
    pub stats: CollectReport,
}

/// Worker threads for verification: the machine's cores.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Ingest {
    pub fn new(spec: Arc<RoundSpec>, store: Store, workers: usize) -> Self {
        let workers = workers.max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        Ingest {
            spec,
            store,
            slots: Arc::new(Semaphore::new(workers)),
            tx,
            rx,
            in_flight: 0,
            verify_us: 0,
            stats: CollectReport {
                workers,
                ..CollectReport::default()
            },
        }
    }

    pub fn spec(&self) -> &RoundSpec {
        &self.spec
    }

    /// Uploads submitted and not yet returned by [`Ingest::recv`].
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `up` for verification; returns at once.
    pub fn submit(&mut self, ticket: u64, up: Upload) {
        self.in_flight += 1;
        self.stats.max_verifying = self.stats.max_verifying.max(self.in_flight as u64);
        let (spec, store, slots, tx) = (
            self.spec.clone(),
            self.store.clone(),
            self.slots.clone(),
            self.tx.clone(),
        );
        tokio::spawn(async move {
            // The semaphore is never closed, so acquiring only fails if it were.
            let _permit = slots.acquire_owned().await;
            let id = UploadId {
                client: up.client.clone(),
                round: up.round,
            };
            let ran = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let outcome = verify_and_write(&spec, &store, &up);
                (outcome, t.elapsed().as_micros() as u64)
            })
            .await;
            let (outcome, us) = match ran {
                Ok(r) => r,
                Err(e) => (
                    Err(CoordinatorError::Io(format!("verification worker: {e}"))),
                    0,
                ),
            };
            let _ = tx.send((
                Done {
                    ticket,
                    upload: id,
                    outcome,
                },
                us,
            ));
        });
    }

    /// The next finished verification, then every other one already finished (a batch for
    /// one group commit). Cancel-safe until it returns; empty when nothing is in flight.
    pub async fn recv(&mut self) -> Vec<Done> {
        let mut out = Vec::new();
        if self.in_flight == 0 {
            return out;
        }
        if let Some(d) = self.rx.recv().await {
            self.take(d, &mut out);
        }
        while let Ok(d) = self.rx.try_recv() {
            self.take(d, &mut out);
        }
        out
    }

    fn take(&mut self, (done, us): (Done, u64), out: &mut Vec<Done>) {
        self.in_flight -= 1;
        self.stats.verified += 1;
        self.verify_us += us;
        self.stats.verify_ms = self.verify_us / 1000;
        out.push(done);
    }

    /// Group commit of `batch` (deltas already written by the workers), off the async threads.
    pub async fn commit(&mut self, batch: Vec<(String, Digest)>) -> Result<(), CoordinatorError> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        let (store, round) = (self.store.clone(), self.spec.round);
        let t = Instant::now();
        let fsyncs = tokio::task::spawn_blocking(move || commit(&store, round, &batch))
            .await
            .map_err(|e| CoordinatorError::Io(format!("group commit: {e}")))??;
        self.stats.commit_ms += t.elapsed().as_millis() as u64;
        self.stats.commits += 1;
        self.stats.max_batch = self.stats.max_batch.max(n);
        // One fsync per delta file (on the workers) plus the commit's own.
        self.stats.fsyncs += n + fsyncs;
        Ok(())
    }
}

/// A round's accepted deltas as the rules see them: metadata in memory, each delta read back
/// from its file (and its digest checked) when a rule asks for it.
pub struct DeltaFiles {
    store: Store,
    round: u64,
    layout: Weights,
    /// Envelope size limit for reading a delta file.
    limit: usize,
    entries: Vec<(String, AcceptedMeta)>,
}

impl DeltaFiles {
    pub fn new(
        store: Store,
        round: u64,
        layout: Weights,
        limit: usize,
        entries: Vec<(String, AcceptedMeta)>,
    ) -> Self {
        DeltaFiles {
            store,
            round,
            layout,
            limit,
            entries,
        }
    }

    /// The accepted clients and their metadata, in client order.
    pub fn entries(&self) -> &[(String, AcceptedMeta)] {
        &self.entries
    }

    fn read(&self, i: usize) -> Result<Weights, String> {
        let (client, meta) = &self.entries[i];
        let path = self
            .store
            .delta_dir(self.round)
            .join(format!("{client}.bin"));
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let rec: DeltaChunk =
            coevo_protocol::envelope::decode(&bytes, coevo_protocol::Kind::DeltaChunk, self.limit)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        if digest(&rec.data) != meta.header.payload_digest {
            return Err(format!(
                "{}: digest differs from the accepted one",
                path.display()
            ));
        }
        Weights::decode_delta(&rec.data, meta.header.codec, &self.layout)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl UpdateSource for DeltaFiles {
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn client(&self, i: usize) -> &str {
        &self.entries[i].0
    }
    fn samples(&self, i: usize) -> u64 {
        self.entries[i].1.header.samples
    }
    fn norm(&self, i: usize) -> Option<f64> {
        Some(self.entries[i].1.norm)
    }
    fn delta(&self, i: usize) -> Result<Cow<'_, Weights>, StrategyError> {
        self.read(i)
            .map(Cow::Owned)
            .map_err(|reason| StrategyError::Read {
                client: self.entries[i].0.clone(),
                reason,
            })
    }
}
