//! The collect pipeline (`coevo_coordinator::ingest`) without MQTT: real Ed25519 keys, real
//! files and fsyncs in a temp dir. Checks that verification on the worker pool accepts exactly
//! the valid uploads, refuses the rest with the right reason and attribution, that a group
//! commit journals the accepted digests, and that the deltas read back from disk are the ones
//! sent (what the rules aggregate, since the round keeps only metadata).

use coevo_coordinator::ingest::{DeltaFiles, Ingest, RoundSpec, Upload};
use coevo_coordinator::store::Store;
use coevo_coordinator::strategy::UpdateSource;
use coevo_coordinator::FleetRegistry;
use coevo_models::{ParamTensor, Weights};
use coevo_protocol::envelope::Kind;
use coevo_protocol::{
    digest, DeltaHeader, Digest, LocalMetrics, RejectReason, Signed, SigningKey, UplinkCodec,
};
use std::collections::BTreeMap;
use std::sync::Arc;

const PARAMS: usize = 1_000;

fn layout() -> Weights {
    let mut w = Weights::default();
    w.tensors.insert(
        "fc.weight".into(),
        ParamTensor {
            shape: vec![10, PARAMS / 10],
            data: vec![0.0; PARAMS],
        },
    );
    w
}

fn delta(layout: &Weights, seed: usize) -> Weights {
    let mut d = layout.clone();
    for t in d.tensors.values_mut() {
        for (k, x) in t.data.iter_mut().enumerate() {
            *x = (((seed * 17 + k) % 41) as f32 - 20.0) * 1e-3;
        }
    }
    d
}

/// A signed f32 upload of `d` from `client`, signed with `key`.
fn upload(client: &str, key: &SigningKey, base: Digest, d: &Weights) -> Upload {
    let payload = UplinkCodec::F32.encode(&d.to_named()).expect("encode");
    let h = DeltaHeader {
        fleet: "city".into(),
        round: 3,
        client: client.into(),
        base_digest: base,
        samples: 50,
        metrics: LocalMetrics::default(),
        codec: UplinkCodec::F32,
        payload_digest: digest(&payload),
        payload_len: payload.len() as u64,
        chunks: 1,
    };
    Upload {
        client: client.into(),
        round: 3,
        header: Some(Signed::sign(Kind::DeltaHeader, &h, client, key)),
        payload,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_accepts_valid_refuses_rest_and_group_commit_journals_them() {
    let layout = layout();
    let base = digest(b"base-3");
    let mut registry = FleetRegistry::default();
    let mut keys = Vec::new();
    for i in 0..6 {
        let key = SigningKey::generate().expect("key");
        registry
            .add(&format!("cam-{i}"), &key.public_key())
            .expect("registry add");
        keys.push(key);
    }
    let mut uploads = Vec::new();
    let mut sent = BTreeMap::new();
    for (i, key) in keys.iter().enumerate().take(4) {
        let d = delta(&layout, i);
        uploads.push(upload(&format!("cam-{i}"), key, base, &d));
        sent.insert(format!("cam-{i}"), d);
    }
    // cam-4 signs with cam-5's key: not provably cam-4's.
    uploads.push(upload("cam-4", &keys[5], base, &delta(&layout, 4)));
    // cam-5's own valid signature, but the payload was altered after signing.
    let mut tampered = upload("cam-5", &keys[5], base, &delta(&layout, 5));
    tampered.payload[0] ^= 0xff;
    uploads.push(tampered);

    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::new(dir.path());
    let spec = Arc::new(RoundSpec {
        fleet: "city".into(),
        round: 3,
        base_digest: base,
        uplink_codec: UplinkCodec::F32,
        max_delta_bytes: 1 << 20,
        layout: layout.clone(),
        registry,
    });
    let mut ingest = Ingest::new(spec, store.clone(), 2);
    for (i, up) in uploads.into_iter().enumerate() {
        ingest.submit(i as u64, up);
    }
    let mut accepted = Vec::new();
    let mut refused = BTreeMap::new();
    while ingest.in_flight() > 0 {
        let mut batch = Vec::new();
        for d in ingest.recv().await {
            match d.outcome.expect("no I/O error") {
                Ok(meta) => {
                    batch.push((d.upload.client.clone(), meta.header.payload_digest));
                    accepted.push((d.upload.client, meta));
                }
                Err(r) => {
                    refused.insert(d.upload.client, (r.reason, r.signed));
                }
            }
        }
        ingest.commit(batch).await.expect("group commit");
    }

    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused["cam-4"], (RejectReason::BadSignature, false));
    assert_eq!(refused["cam-5"].0, RejectReason::DigestMismatch);
    assert!(
        refused["cam-5"].1,
        "cam-5's header carried its own valid signature"
    );
    assert_eq!(ingest.stats.verified, 6);
    assert!(ingest.stats.commits >= 1 && ingest.stats.commits <= 4);
    // One fsync per accepted file plus a directory and a journal fsync per group commit.
    assert_eq!(ingest.stats.fsyncs, 4 + 2 * ingest.stats.commits);

    // The journal names exactly the accepted digests.
    let journal = store.load_journal(3).expect("journal");
    let mut journalled: Vec<(String, String)> =
        journal.into_iter().map(|e| (e.client, e.digest)).collect();
    journalled.sort();
    let mut want: Vec<(String, String)> = accepted
        .iter()
        .map(|(c, m)| (c.clone(), m.header.payload_digest.to_string()))
        .collect();
    want.sort();
    assert_eq!(journalled, want);

    // Read back from disk: the deltas sent, with the norms computed at accept time.
    accepted.sort_by(|a, b| a.0.cmp(&b.0));
    let files = DeltaFiles::new(store, 3, layout, 4 << 20, accepted);
    assert_eq!(files.len(), 4);
    for i in 0..files.len() {
        let client = files.client(i).to_string();
        let got = files.delta(i).expect("read back");
        assert_eq!(got.as_ref(), &sent[&client], "{client}");
        let norm = files.norm(i).expect("norm kept");
        assert!((norm - sent[&client].l2_norm()).abs() < 1e-9, "{client}");
    }
}
