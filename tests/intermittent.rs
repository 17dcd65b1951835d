//! Intermittent cameras (issue 17, Must 6), over real MQTT: embedded broker, real coordinator,
//! real edge agents training with libtorch on small synthetic data.
//!
//! A camera takes part in round 1, is switched off for rounds 2 and 3 (which complete with
//! the other cameras at their deadline), is switched on again with the same `state_dir` and
//! is accepted in round 4 without anyone touching it. Its error-feedback residual from round
//! 1 is three rounds old by then, above the default `max_residual_age_rounds` (2), so it is
//! dropped rather than added to round 4's delta; cameras that never missed a round keep
//! theirs.

mod common;

use coevo_coordinator::RoundEvent;
use coevo_edge::{state, AgentSummary, DroppedResidual};
use coevo_models::data::synthetic;
use common::*;
use std::time::{Duration, Instant};

/// Waits for an agent task and returns its summary.
async fn finished(
    h: tokio::task::JoinHandle<Result<AgentSummary, coevo_edge::EdgeError>>,
    what: &str,
) -> AgentSummary {
    tokio::time::timeout(Duration::from_secs(60), h)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
        .expect("agent task")
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The offline camera rejoins round 4 by itself, with its three-round-old residual dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_offline_for_two_rounds_rejoins_with_its_stale_residual_dropped() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 3);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let data = synthetic(3 * 96, 64, SHAPE, 17);
    let part = |i: usize| {
        data.train
            .subset(&(i * 96..(i + 1) * 96).collect::<Vec<_>>())
    };
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 4);
    // Rounds 2 and 3 wait for the missing camera until their deadline, then close with the
    // two others; round 1 and 4 close as soon as all three are in.
    cfg.round.quorum = 2;
    cfg.round.timeout_s = 5;
    // The model guard is not under test, and on 64 test images its verdict is noise.
    cfg.guard.enabled = false;
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state_dir = dir.path().join("state/cam-0");
    let with_state = |o: &mut coevo_edge::AgentOptions, rounds: u64| {
        o.max_rounds = Some(rounds);
        o.state_dir = Some(state_dir.clone());
    };
    let first = spawn_agent_custom(&fleet, 0, addr, part(0), &stop_rx, |o| with_state(o, 1));
    let others: Vec<_> = (1..3)
        .map(|i| spawn_agent_for(&fleet, i, addr, part(i), &stop_rx, Some(4)))
        .collect();

    // Round 1 with the camera; then it is switched off (its agent ends after one round).
    let s1 = finished(first, "cam-0, round 1").await;
    assert_eq!(s1.accepted_rounds, vec![1]);
    assert!(s1.dropped_residuals.is_empty());
    assert_eq!(
        state::load_residual_round(&state_dir),
        Some(1),
        "the residual's round is kept beside it"
    );
    assert!(state_dir.join(coevo_edge::agent::RESIDUAL_FILE).exists());

    // Switched on again once round 3 has closed without it and round 4 is published. (Switched
    // on between the two, it would take round 3's retained manifest, whose deadline plus
    // grace has not passed, get a `late` receipt for it and then take round 4.)
    let mut back = None;
    let mut reports = Vec::new();
    let mut switched_on = None;
    let mut rejoined = None;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
        if let RoundEvent::Accepted {
            round: 4, client, ..
        } = &ev
        {
            if client == "cam-0" {
                rejoined = switched_on.map(|t: Instant| t.elapsed());
            }
        }
        if let RoundEvent::Started { round: 4, .. } = ev {
            switched_on = Some(Instant::now());
            back = Some(spawn_agent_custom(
                &fleet,
                0,
                addr,
                part(0),
                &stop_rx,
                |o| with_state(o, 1),
            ));
        }
        if let RoundEvent::Finished(r) = ev {
            reports.push(*r);
        }
    }
    coord.await.unwrap().unwrap();
    let s4 = finished(back.expect("round 4 started"), "cam-0, back").await;

    let accepted: Vec<_> = reports.iter().map(|r| (r.round, r.accepted)).collect();
    assert_eq!(
        accepted,
        vec![(1, 3), (2, 2), (3, 2), (4, 3)],
        "{reports:?}"
    );
    assert!(reports.iter().all(|r| r.outcome == "completed"));
    let in_round_4 = assert_merge_consistent(&out, 4);
    assert!(in_round_4.contains(&"cam-0".to_string()), "{in_round_4:?}");

    // It joined round 4, the current one, without operator action ...
    assert_eq!(s4.accepted_rounds, vec![4]);
    // ... read its round-1 residual back, and dropped it as three rounds old.
    let restored = s4
        .restored_residual_norm
        .expect("residual read from state_dir");
    assert!(restored > 0.0, "int8 leaves a non-zero residual");
    assert_eq!(
        s4.dropped_residuals,
        vec![DroppedResidual {
            round: 4,
            computed_in: Some(1),
            norm: restored
        }]
    );
    assert_eq!(state::load_residual_round(&state_dir), Some(4));
    // Cameras that took part in every round kept theirs (age 1).
    for (i, h) in others.into_iter().enumerate() {
        let s = finished(h, "always-on camera").await;
        assert_eq!(s.accepted_rounds, vec![1, 2, 3, 4], "cam-{}", i + 1);
        assert!(s.dropped_residuals.is_empty(), "cam-{}", i + 1);
    }
    eprintln!(
        "EINT offline-rejoin: cam-0 accepted in rounds 1 and 4, residual of norm {restored:.4} \
         from round 1 dropped in round 4; switched on to accepted {:.2}s; test {:.1}s",
        rejoined.map_or(f64::NAN, |d| d.as_secs_f64()),
        t0.elapsed().as_secs_f64()
    );
}

/// `max_residual_age_rounds = 0` would drop every residual, i.e. silently turn error feedback
/// off: refused with a clear message instead.
#[test]
fn zero_max_residual_age_is_refused() {
    let key = coevo_protocol::SigningKey::generate().unwrap();
    let mut o = coevo_edge::AgentOptions::new(FLEET, "cam-0", "coordinator", key.public_key());
    o.max_residual_age_rounds = 0;
    let data = synthetic(8, 8, SHAPE, 1).train;
    let err = match coevo_edge::Agent::new(o, key, data) {
        Ok(_) => panic!("accepted max_residual_age_rounds = 0"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("max_residual_age_rounds must be at least 1"),
        "{err}"
    );
}
