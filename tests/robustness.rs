//! Byzantine clients through the whole stack (issue #6): 6 agents over real MQTT, one uploading
//! a sign-flipped delta and one a delta with NaN/∞ values, against the coordinate-wise median.
//! The NaN upload must be rejected with its reason in every round's report, the sign flip
//! (well-formed and correctly signed) accepted and outvoted, and the student as good as in a
//! clean run of the same fleet.

mod common;

use coevo::demo::{run_fleet_with, FleetRun};
use coevo_coordinator::coevolve::ServerData;
use coevo_coordinator::config::{BelowQuorum, RoundPolicy};
use coevo_coordinator::strategy::StrategyConfig;
use coevo_coordinator::RoundReport;
use coevo_edge::Attack;
use coevo_models::data::synthetic;
use coevo_models::DataSplit;
use std::path::Path;

const CLIENTS: usize = 6;
const ROUNDS: u64 = 2;
const SIGN_FLIP: &str = "cam-4";
const NAN: &str = "cam-5";

/// Two median rounds of the 6-client fleet in `out`, with the attackers on or off.
async fn run(data: &DataSplit, out: &Path, attackers: bool) -> Vec<RoundReport> {
    run_with(data, out, attackers, StrategyConfig::Median, None).await
}

/// Two rounds of the 6-client fleet under `strategy`, with `server` data for the coordinator.
async fn run_with(
    data: &DataSplit,
    out: &Path,
    attackers: bool,
    strategy: StrategyConfig,
    server: Option<ServerData>,
) -> Vec<RoundReport> {
    let clients = common::iid_clients(&data.train, CLIENTS);
    run_fleet_with(
        FleetRun {
            fleet: "robust",
            out,
            clients,
            test: data.test.shallow_clone(),
            seed: 3,
        },
        |c| {
            c.rounds = ROUNDS;
            c.aggregation = strategy;
            // The NaN client is never accepted, so attacked rounds close at the deadline once
            // the 5 others are in; the extensions absorb a loaded machine.
            c.round = RoundPolicy {
                quorum: (CLIENTS - 1) as u32,
                timeout_s: 10,
                below_quorum: BelowQuorum::Extend,
                max_extensions: 3,
            };
        },
        |c| match server {
            Some(s) => c.with_server_data(s),
            None => c,
        },
        |o| {
            o.attack = match o.client_id.as_str() {
                SIGN_FLIP if attackers => Some(Attack::SignFlip),
                NAN if attackers => Some(Attack::NonFinite),
                _ => None,
            }
        },
        &mut |_| {},
    )
    .await
    .expect("fleet run")
}

fn final_accuracy(reports: &[RoundReport]) -> f64 {
    let last = reports.last().expect("a report");
    assert_eq!(last.round, ROUNDS);
    last.student.test_accuracy.expect("student evaluated")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn median_outvotes_a_sign_flip_and_nan_is_rejected() {
    common::init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic(1200, 300, common::SHAPE, 21);

    let clean = run(&data, &dir.path().join("clean"), false).await;
    let attacked = run(&data, &dir.path().join("attacked"), true).await;
    assert_eq!(attacked.len(), ROUNDS as usize);

    for r in &attacked {
        assert_eq!(r.outcome, "completed", "round {}", r.round);
        // Only the NaN upload is rejected, for being non-finite, once a round.
        let rejected: Vec<(&str, &str)> = r
            .rejected
            .iter()
            .map(|x| (x.client.as_str(), x.reason.as_str()))
            .collect();
        assert_eq!(rejected, vec![(NAN, "non-finite")], "round {}", r.round);
        // The sign flip passes every check: only the aggregation rule can deal with it.
        let accepted: Vec<&str> = r.clients.iter().map(|c| c.client.as_str()).collect();
        assert!(
            accepted.contains(&SIGN_FLIP),
            "round {}: {accepted:?}",
            r.round
        );
        assert!(!accepted.contains(&NAN), "round {}: {accepted:?}", r.round);
        assert_eq!(r.accepted, CLIENTS - 1, "round {}", r.round);
    }
    for r in &clean {
        assert!(
            r.rejected.is_empty(),
            "clean round {}: {:?}",
            r.round,
            r.rejected
        );
        assert_eq!(r.accepted, CLIENTS, "clean round {}", r.round);
    }

    let (clean_acc, attacked_acc) = (final_accuracy(&clean), final_accuracy(&attacked));
    // The synthetic classes are easy: a working fleet is far above chance (0.1) after 2 rounds.
    assert!(clean_acc > 0.5, "clean run only reached {clean_acc}");
    assert!(
        attacked_acc >= clean_acc - 0.1,
        "median under attack {attacked_acc} vs clean {clean_acc}"
    );
}

/// FLTrust through the whole stack: the coordinator trains its reference delta on its own
/// labelled data every round, and the sign-flipped delta, pointing away from it, is excluded as
/// `untrusted` while every honest one is merged. Without server data the coordinator refuses to
/// start rather than aggregate without a reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fltrust_excludes_a_sign_flip_by_the_servers_reference() {
    common::init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic(1200, 300, common::SHAPE, 21);

    let fleet = common::fleet(&dir.path().join("fleet"), 2);
    let mut cfg = common::coordinator_config(
        &fleet,
        "127.0.0.1:1".parse().expect("addr"),
        dir.path().join("refused"),
        1,
    );
    cfg.aggregation = StrategyConfig::FlTrust;
    let refused = coevo_coordinator::Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        data.test.shallow_clone(),
    )
    .expect("config is valid")
    .run(std::future::pending())
    .await;
    let err = refused
        .expect_err("no server data, no reference")
        .to_string();
    assert!(err.contains("server_data"), "{err}");

    // The server's labelled set: a class-balanced slice the clients also hold (synthetic data).
    let idx: Vec<usize> = (0..200).collect();
    let server = ServerData {
        labelled: data.train.subset(&idx),
        unlabelled: data.train.subset(&idx),
        validation: data.test.subset(&idx[..50]),
    };
    let reports = run_with(
        &data,
        &dir.path().join("fltrust"),
        true,
        StrategyConfig::FlTrust,
        Some(server),
    )
    .await;
    for r in &reports {
        assert_eq!(r.strategy, "fltrust");
        assert_eq!(r.outcome, "completed", "round {}", r.round);
        let excluded: Vec<(&str, &str)> = r
            .excluded
            .iter()
            .map(|x| (x.client.as_str(), x.reason.as_str()))
            .collect();
        assert_eq!(
            excluded,
            vec![(SIGN_FLIP, "untrusted")],
            "round {}",
            r.round
        );
        assert_eq!(r.accepted, CLIENTS - 1, "round {}", r.round);
        // Every accepted delta's trust weight is reported: 0 for the sign flip, the honest
        // ones share the whole merge.
        let trust = |c: &str| {
            r.clients
                .iter()
                .find(|x| x.client == c)
                .and_then(|x| x.trust_weight)
                .unwrap_or_else(|| panic!("round {}: no trust weight for {c}", r.round))
        };
        assert_eq!(trust(SIGN_FLIP), 0.0);
        let total: f64 = r.clients.iter().filter_map(|x| x.trust_weight).sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "round {}: Σ trust {total}",
            r.round
        );
    }
    let acc = final_accuracy(&reports);
    assert!(acc > 0.5, "fltrust under attack only reached {acc}");
}
