//! Byzantine behaviour, **for tests and benches only**: an agent given an [`Attack`] still
//! trains honestly, then corrupts what it uploads, so `coevo bench robustness` and the
//! integration tests can measure what the coordinator's checks and robust aggregation rules
//! actually stop. Nothing in a device's configuration file can turn it on; only code that
//! builds [`AgentOptions`](crate::AgentOptions) itself can.
//!
//! The attacks split in two:
//! - *payload* attacks ([`Attack::SignFlip`], [`Attack::Scale`], [`Attack::GaussianNoise`],
//!   [`Attack::NonFinite`]) rewrite the honest delta before it is encoded and signed: the
//!   upload is well-formed and correctly signed, so only the finite-value check or the
//!   aggregation rule can stop it;
//! - *envelope* attacks ([`Attack::StaleReplay`], [`Attack::Impersonate`]) keep the delta and
//!   misuse the protocol instead: signatures, round binding and the registry must stop them.

use coevo_models::Weights;
use coevo_protocol::Digest;

/// What a Byzantine client does to its upload.
#[derive(Clone, Debug, PartialEq)]
pub enum Attack {
    /// Uploads −Δ: the same norm as the honest delta, pointing the other way. Same norm on
    /// purpose, so a norm bound cannot tell it from an honest update (the strong form of the
    /// attack for norm clipping; ×1 rather than ×k keeps it distinct from [`Attack::Scale`]).
    SignFlip,
    /// Uploads Δ × factor (e.g. 10): the classic boosting attack that norm bounds exist for.
    Scale(f32),
    /// Replaces Δ with Gaussian noise N(0, σ²) per coordinate, where σ = `relative_std` × the
    /// RMS of the honest delta's coordinates, so the noise's norm is ≈ `relative_std` × the
    /// honest norm: relative rather than absolute because honest norms shrink as training
    /// converges, and a fixed σ would turn into a scaling attack late in a run.
    GaussianNoise { relative_std: f32 },
    /// Makes some values of the honest delta NaN and +∞ (the first and last value of every
    /// tensor): what a diverged or malicious client sends; the coordinator's finite-value
    /// check must reject it before it reaches any aggregation rule.
    NonFinite,
    /// Re-sends the previous round's signed upload byte for byte (topic, header, chunks)
    /// instead of this round's: a captured device replaying what it already said. In its
    /// first round there is nothing to replay yet, so it uploads honestly.
    StaleReplay,
    /// Publishes its (honest) delta on `victim`'s topic with `victim`'s id in the header and
    /// chunks, signed with its own key: a registered device posing as another one. The
    /// brokers we configure refuse the publish by topic ACL (the embedded one closes the
    /// connection); the coordinator's signature check is the second line, for a broker without
    /// ACLs. It uploads nothing
    /// under its own id, and sends once: the coordinator's receipt goes to the victim's topic.
    Impersonate { victim: String },
}

impl Attack {
    /// Stable short name (`sign-flip`, `scale`, `noise`, `nan`, `replay`, `impersonate`).
    pub fn name(&self) -> &'static str {
        match self {
            Attack::SignFlip => "sign-flip",
            Attack::Scale(_) => "scale",
            Attack::GaussianNoise { .. } => "noise",
            Attack::NonFinite => "nan",
            Attack::StaleReplay => "replay",
            Attack::Impersonate { .. } => "impersonate",
        }
    }

    /// Rewrites the honest `delta` in place (payload attacks; envelope attacks leave it
    /// alone). `seed` drives the noise, so a run is reproducible.
    pub fn corrupt_delta(&self, delta: &mut Weights, seed: u64) {
        match self {
            Attack::SignFlip => delta.scale(-1.0),
            Attack::Scale(factor) => delta.scale(*factor),
            Attack::GaussianNoise { relative_std } => {
                let n = delta.num_params().max(1);
                let rms = delta.l2_norm() / (n as f64).sqrt();
                let sigma = f64::from(*relative_std) * rms;
                let mut rng = Normal::new(seed);
                for t in delta.tensors.values_mut() {
                    for x in t.data.iter_mut() {
                        *x = (sigma * rng.next()) as f32;
                    }
                }
            }
            Attack::NonFinite => {
                for t in delta.tensors.values_mut() {
                    if let Some(x) = t.data.first_mut() {
                        *x = f32::NAN;
                    }
                    if t.data.len() > 1 {
                        if let Some(x) = t.data.last_mut() {
                            *x = f32::INFINITY;
                        }
                    }
                }
            }
            Attack::StaleReplay | Attack::Impersonate { .. } => {}
        }
    }

    /// The client id the upload claims (topic, header, chunks, signer id): the victim's for
    /// [`Attack::Impersonate`], otherwise `own`.
    pub fn claimed_id<'a>(&'a self, own: &'a str) -> &'a str {
        match self {
            Attack::Impersonate { victim } => victim,
            _ => own,
        }
    }

    /// False when the coordinator's receipt for this upload goes to someone else's topic, so
    /// waiting for it (and re-sending meanwhile) would only repeat the attack until the round
    /// closes.
    pub fn expects_receipt(&self) -> bool {
        !matches!(self, Attack::Impersonate { .. })
    }
}

/// The `f32` wire payload of `delta` with its values exactly as they are, NaN and ∞ included.
///
/// The codec refuses to encode non-finite values (an honest client must never send them), so
/// [`Attack::NonFinite`] encodes a finite copy and writes the raw values into the payload's
/// `f32` body (its last `4 · n` bytes) afterwards: the coordinator's decoder must catch them.
/// Always an `f32` payload: a round with a compressed uplink rejects it as malformed first.
pub fn raw_f32_payload(delta: &Weights) -> Result<Vec<u8>, coevo_protocol::CodecError> {
    let mut finite = delta.to_named();
    for t in &mut finite {
        t.values.iter_mut().for_each(|v| *v = 0.0);
    }
    let mut payload = coevo_protocol::UplinkCodec::F32.encode(&finite)?;
    let body: Vec<u8> = delta
        .tensors
        .values()
        .flat_map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    let start = payload.len().saturating_sub(body.len());
    payload[start..].copy_from_slice(&body);
    Ok(payload)
}

/// The seed of a client's corruption in one round: its training seed mixed with its id, so
/// attackers sharing a run seed still draw different noise.
pub(crate) fn corruption_seed(client_id: &str, train_seed: u64) -> u64 {
    let d = coevo_protocol::digest(client_id.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&d.0[..8]);
    train_seed ^ u64::from_le_bytes(head)
}

/// A signed upload exactly as it goes on the wire: what the receipt must name, and the
/// (topic, payload) messages.
#[derive(Clone, Debug, PartialEq)]
pub struct WireUpload {
    pub round: u64,
    pub payload_digest: Digest,
    pub messages: Vec<(String, Vec<u8>)>,
}

/// [`Attack::StaleReplay`]'s memory: returns the upload to send instead of `current` (the
/// previous round's, byte for byte; `current` itself the first time) and keeps `current` for
/// the next round.
pub(crate) fn stale_replay(kept: &mut Option<WireUpload>, current: WireUpload) -> WireUpload {
    match kept.replace(current.clone()) {
        Some(previous) => previous,
        None => current,
    }
}

/// Standard normal samples from SplitMix64 + Box–Muller: deterministic per seed, and
/// independent of libtorch's global generator, which the agents of one process share.
struct Normal {
    state: u64,
    spare: Option<f64>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Normal {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coevo_models::ParamTensor;

    /// Two tensors, 1000 values in all, none zero.
    fn delta() -> Weights {
        let mut w = Weights::default();
        for (name, n) in [("a.weight", 600usize), ("b.bias", 400)] {
            w.tensors.insert(
                name.into(),
                ParamTensor {
                    shape: vec![n],
                    data: (0..n).map(|i| ((i % 7) as f32 - 3.5) * 1e-3).collect(),
                },
            );
        }
        w
    }

    fn values(w: &Weights) -> Vec<f32> {
        w.tensors.values().flat_map(|t| t.data.clone()).collect()
    }

    #[test]
    fn sign_flip_negates_every_value() {
        let honest = delta();
        let mut d = honest.clone();
        Attack::SignFlip.corrupt_delta(&mut d, 1);
        for (a, b) in values(&d).iter().zip(values(&honest)) {
            assert_eq!(*a, -b);
        }
        assert!((d.l2_norm() - honest.l2_norm()).abs() < 1e-12);
    }

    #[test]
    fn scale_multiplies_the_norm() {
        let honest = delta();
        let mut d = honest.clone();
        Attack::Scale(10.0).corrupt_delta(&mut d, 1);
        let ratio = d.l2_norm() / honest.l2_norm();
        assert!((ratio - 10.0).abs() < 1e-4, "ratio {ratio}");
        assert!(d.same_layout(&honest));
    }

    #[test]
    fn noise_replaces_the_delta_with_a_comparable_norm() {
        let honest = delta();
        let mut d = honest.clone();
        Attack::GaussianNoise { relative_std: 1.0 }.corrupt_delta(&mut d, 7);
        assert!(d.same_layout(&honest) && d.all_finite());
        let ratio = d.l2_norm() / honest.l2_norm();
        // 1000 coordinates: the norm of N(0, σ²) noise is within a few % of σ·√n.
        assert!((0.9..1.1).contains(&ratio), "noise/honest norm {ratio}");
        // Uncorrelated with the honest delta, and roughly zero-mean.
        let dot: f64 = values(&d)
            .iter()
            .zip(values(&honest))
            .map(|(a, b)| f64::from(*a) * f64::from(b))
            .sum();
        let cos = dot / (d.l2_norm() * honest.l2_norm());
        assert!(cos.abs() < 0.15, "cosine with the honest delta {cos}");
        // Seeded: the same seed gives the same noise, another seed different noise.
        let mut again = honest.clone();
        Attack::GaussianNoise { relative_std: 1.0 }.corrupt_delta(&mut again, 7);
        assert_eq!(values(&again), values(&d));
        let mut other = honest.clone();
        Attack::GaussianNoise { relative_std: 1.0 }.corrupt_delta(&mut other, 8);
        assert_ne!(values(&other), values(&d));
    }

    #[test]
    fn non_finite_poisons_some_values_only() {
        let honest = delta();
        let mut d = honest.clone();
        Attack::NonFinite.corrupt_delta(&mut d, 1);
        assert!(!d.all_finite());
        let v = values(&d);
        assert!(v.iter().any(|x| x.is_nan()) && v.iter().any(|x| x.is_infinite()));
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        assert_eq!(bad, 4, "first and last value of each of the 2 tensors");
        assert!(d.same_layout(&honest));
    }

    #[test]
    fn envelope_attacks_leave_the_delta_alone() {
        let honest = delta();
        for a in [
            Attack::StaleReplay,
            Attack::Impersonate {
                victim: "cam-2".into(),
            },
        ] {
            let mut d = honest.clone();
            a.corrupt_delta(&mut d, 1);
            assert_eq!(d, honest, "{}", a.name());
        }
    }

    #[test]
    fn impersonation_claims_the_victims_id_and_expects_no_receipt() {
        let a = Attack::Impersonate {
            victim: "cam-2".into(),
        };
        assert_eq!(a.claimed_id("cam-9"), "cam-2");
        assert!(!a.expects_receipt());
        assert_eq!(Attack::SignFlip.claimed_id("cam-9"), "cam-9");
        assert!(Attack::StaleReplay.expects_receipt());
    }

    fn upload(round: u64) -> WireUpload {
        WireUpload {
            round,
            payload_digest: coevo_protocol::digest(&round.to_le_bytes()),
            messages: vec![(format!("delta/cam-1/{round}/0"), vec![round as u8; 3])],
        }
    }

    #[test]
    fn stale_replay_sends_the_previous_rounds_bytes() {
        let mut kept = None;
        // Nothing to replay in the first round: the honest upload goes out.
        assert_eq!(stale_replay(&mut kept, upload(1)), upload(1));
        assert_eq!(stale_replay(&mut kept, upload(2)), upload(1));
        assert_eq!(stale_replay(&mut kept, upload(3)), upload(2));
    }
}
