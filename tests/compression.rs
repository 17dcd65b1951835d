//! Compressed rounds end to end through the real broker: an int8 student goes down, top-k
//! deltas with error feedback come up, the coordinator merges them onto the dequantised base,
//! the reports count the bytes, and a client's residual survives its restart.

mod common;

use coevo_coordinator::store::Store;
use coevo_edge::agent::RESIDUAL_FILE;
use coevo_models::data::synthetic;
use coevo_models::Weights;
use coevo_protocol::codec::Limits;
use coevo_protocol::{DownlinkCodec, ErrorFeedback, UplinkCodec};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_rounds_and_the_residual_survives_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 2);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let data = synthetic(400, 100, SHAPE, 21);
    let out = dir.path().join("out");
    let uplink = UplinkCodec::TopK {
        rho: 0.01,
        error_feedback: true,
    };
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 2);
    cfg.transfer.downlink_codec = DownlinkCodec::Int8;
    cfg.transfer.uplink_codec = uplink;
    cfg.round.quorum = 2;
    cfg.round.timeout_s = 60;
    let (coord, _events) = spawn_coordinator(cfg, &fleet, &data.test);
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // cam-1 runs both rounds in one go; cam-0 is stopped after round 1 and started again.
    let steady = spawn_agent_for(
        &fleet,
        1,
        addr,
        data.train.shallow_clone(),
        &stop_rx,
        Some(2),
    );
    let state = dir.path().join("state/cam-0");
    let first = spawn_agent_custom(&fleet, 0, addr, data.train.shallow_clone(), &stop_rx, |o| {
        o.max_rounds = Some(1);
        o.state_dir = Some(state.clone());
    });
    let s1 = first.await.unwrap().unwrap();
    assert_eq!(s1.accepted_rounds, vec![1]);
    assert_eq!(
        s1.restored_residual_norm, None,
        "nothing on disk before round 1"
    );
    let limits = Limits::for_params(1 << 24);
    let r1 = ErrorFeedback::load(&state.join(RESIDUAL_FILE), limits)
        .unwrap()
        .expect("the residual is on disk after round 1");
    let n1 = r1.residual_norm();
    assert!(
        n1 > 0.0,
        "top-k 1 % leaves most of the delta in the residual"
    );

    // A new agent (a restarted device) picks the residual up and adds it to round 2's delta.
    let second = spawn_agent_custom(&fleet, 0, addr, data.train.shallow_clone(), &stop_rx, |o| {
        o.max_rounds = Some(1);
        o.state_dir = Some(state.clone());
    });
    let s2 = second.await.unwrap().unwrap();
    assert_eq!(s2.accepted_rounds, vec![2]);
    assert_eq!(s2.restored_residual_norm, Some(n1));
    assert!(s2.dropped_residuals.is_empty(), "one round old: kept");
    let r2 = ErrorFeedback::load(&state.join(RESIDUAL_FILE), limits)
        .unwrap()
        .unwrap();
    assert_ne!(r1, r2, "round 2 committed a new residual");
    assert_eq!(steady.await.unwrap().unwrap().accepted_rounds, vec![1, 2]);

    let reports = coord.await.unwrap().unwrap();
    assert_eq!(reports.len(), 2);
    let store = Store::new(&out);
    for r in &reports {
        assert_eq!(r.outcome, "completed");
        assert_eq!(r.uplink_codec, "top-k:0.01");
        assert_eq!(r.downlink_codec, "int8");
        assert_eq!(r.accepted, 2);
        // Merged onto the int8-decoded base, exactly FedAvg of the stored (decoded) deltas.
        assert_merge_consistent(&out, r.round);
        let base = Weights::decode(
            &std::fs::read(store.checkpoint_path(r.round - 1)).unwrap(),
            coevo_models::WeightCodec::F32,
            1 << 28,
        )
        .unwrap();
        let f32_bytes = base.num_params() as u64 * 4;
        let model_bytes = r.bytes_down / r.registered as u64;
        assert!(
            model_bytes * 7 / 2 < f32_bytes,
            "int8 model {model_bytes} B vs {f32_bytes} B in f32"
        );
        let keep = uplink.keep_count(base.num_params()).unwrap();
        for c in &r.clients {
            assert_eq!(c.bytes_down, model_bytes);
            assert!(
                c.bytes_up * 50 < f32_bytes,
                "{}: {} B up vs {f32_bytes} B in f32",
                c.client,
                c.bytes_up
            );
        }
        assert_eq!(
            r.bytes_up,
            r.clients.iter().map(|c| c.bytes_up).sum::<u64>()
        );
        for rec in store.load_deltas(r.round, 1 << 28).unwrap() {
            let d = Weights::decode_delta(&rec.data, uplink, &base).unwrap();
            let sent = d
                .tensors
                .values()
                .flat_map(|t| &t.data)
                .filter(|v| **v != 0.0)
                .count();
            assert!(
                sent > 0 && sent <= keep,
                "{sent} entries sent, {keep} allowed"
            );
        }
    }
}
