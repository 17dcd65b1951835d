//! Stage 1, publish: the round's model (retained chunks) and its signed manifest.

use super::{now_ms, Coordinator, RoundInputs};
use crate::CoordinatorError;
use coevo_models::Weights;
use coevo_mqtt::Session;
use coevo_protocol::chunk::split;
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{
    digest, Digest, ModelChunk, ModelRef, RoundManifest, Signed, SigningKey, Topic, TrainTask,
};

/// What publishing leaves for the later stages: the wire messages (republished on reconnects
/// and deadline extensions) and the models the round starts from.
pub(super) struct Published {
    pub manifest: RoundManifest,
    manifest_wire: Vec<u8>,
    model_wire: Vec<(String, Vec<u8>)>,
    pub model_digest: Digest,
    /// Encoded model bytes (what each client downloads).
    pub model_bytes: u64,
    pub chunks: u32,
    /// The model before the downlink codec's rounding: kept when nothing is merged.
    pub undecoded: Weights,
    /// The model as clients decode it: what their deltas are merged onto.
    pub round_base: Weights,
}

impl Published {
    /// Moves the deadline by `ms` and re-signs the manifest.
    pub fn extend(&mut self, ms: u64, coordinator: &str, key: &SigningKey) {
        self.manifest.deadline_unix_ms += ms;
        let signed = Signed::sign(Kind::Manifest, &self.manifest, coordinator, key);
        self.manifest_wire = envelope::encode(Kind::Manifest, &signed);
    }

    /// Publishes the model and the manifest again (e.g. after a broker restart lost them).
    pub async fn republish(&self, session: &Session, fleet: &str) -> Result<(), CoordinatorError> {
        publish_round(session, fleet, &self.model_wire, &self.manifest_wire).await
    }
}

impl Coordinator {
    /// Encodes `global` with the downlink codec, replaces it by what clients will decode (the
    /// round's base: deltas are merged onto exactly what they were computed against, and the
    /// downlink's rounding is never silently added to the next round's error), publishes model
    /// and manifest and clears the previous model's retained chunks.
    pub(super) async fn publish_stage(
        &self,
        inputs: &RoundInputs,
        session: &Session,
        global: &mut Weights,
        previous_model: Option<(Digest, u32)>,
    ) -> Result<Published, CoordinatorError> {
        let cfg = &self.cfg;
        let round = inputs.round;
        let model_bytes = global.encode_model(cfg.transfer.downlink_codec)?;
        let undecoded = std::mem::replace(
            global,
            Weights::decode_model(&model_bytes, cfg.transfer.downlink_codec, global)?,
        );
        let round_base = global.clone();
        let model_digest = digest(&model_bytes);
        let chunk_size = cfg.transfer.chunk_size as usize;
        let chunks = split(&model_bytes, chunk_size);
        let manifest = RoundManifest {
            fleet: cfg.fleet.clone(),
            round,
            coordinator: cfg.client_id.clone(),
            model: ModelRef {
                digest: model_digest,
                size: model_bytes.len() as u64,
                codec: cfg.transfer.downlink_codec,
                chunks: chunks.len() as u32,
                arch: inputs.arch.clone(),
            },
            task: TrainTask {
                epochs: cfg.task.epochs,
                batch_size: cfg.task.batch_size,
                lr: cfg.task.lr,
                momentum: cfg.task.momentum,
                prox_mu: cfg.task.prox_mu,
            },
            uplink_codec: cfg.transfer.uplink_codec,
            max_delta_bytes: cfg.transfer.max_delta_bytes,
            chunk_size: cfg.transfer.chunk_size,
            deadline_unix_ms: now_ms() + cfg.round.timeout_s * 1000,
            quorum: cfg.round.quorum,
            issued_unix_ms: now_ms(),
        };
        let signed = Signed::sign(Kind::Manifest, &manifest, &cfg.client_id, &self.key);
        let manifest_wire = envelope::encode(Kind::Manifest, &signed);
        // The student's TorchScript module (if any) goes first, through the same retained,
        // chunked transport under its own digest: the signed manifest names that digest, so
        // cameras verify the module exactly like the weights. It is the same every round, so
        // it is never cleared (a camera caches it by digest and fetches it once).
        let mut model_wire = match self.archs.student.module() {
            Some(m) => chunk_messages(&cfg.fleet, m.digest(), m.bytes(), chunk_size),
            None => Vec::new(),
        };
        model_wire.extend(chunk_messages(
            &cfg.fleet,
            model_digest,
            &model_bytes,
            chunk_size,
        ));
        publish_round(session, &cfg.fleet, &model_wire, &manifest_wire).await?;
        if let Some((old, n)) = previous_model {
            if old != model_digest {
                // Clear the old model's retained chunks: an empty retained payload deletes them.
                for i in 0..n {
                    let t = Topic::ModelChunk {
                        digest: old,
                        index: i,
                    };
                    session
                        .publish(t.path(&cfg.fleet), Vec::new(), true)
                        .await?;
                }
            }
        }
        Ok(Published {
            manifest,
            manifest_wire,
            model_wire,
            model_digest,
            model_bytes: model_bytes.len() as u64,
            chunks: chunks.len() as u32,
            undecoded,
            round_base,
        })
    }
}

/// The retained `model/{digest}/{i}` messages of `bytes` cut at `chunk_size`.
fn chunk_messages(
    fleet: &str,
    digest: Digest,
    bytes: &[u8],
    chunk_size: usize,
) -> Vec<(String, Vec<u8>)> {
    let chunks = split(bytes, chunk_size);
    chunks
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let c = ModelChunk {
                digest,
                index: i as u32,
                total: chunks.len() as u32,
                data: data.to_vec(),
            };
            (
                Topic::ModelChunk {
                    digest,
                    index: i as u32,
                }
                .path(fleet),
                envelope::encode(Kind::ModelChunk, &c),
            )
        })
        .collect()
}

async fn publish_round(
    session: &Session,
    fleet: &str,
    model: &[(String, Vec<u8>)],
    manifest: &[u8],
) -> Result<(), CoordinatorError> {
    // Model first, so a client that sees the manifest can already fetch every chunk.
    for (topic, bytes) in model {
        session.publish(topic.clone(), bytes.clone(), true).await?;
    }
    session
        .publish(Topic::RoundCurrent.path(fleet), manifest.to_vec(), true)
        .await?;
    Ok(())
}
