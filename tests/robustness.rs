//! Byzantine clients through the whole stack (issue #6): 6 agents over real MQTT, one uploading
//! a sign-flipped delta and one a delta with NaN/∞ values, against the coordinate-wise median.
//! The NaN upload must be rejected with its reason in every round's report, the sign flip
//! (well-formed and correctly signed) accepted and outvoted, and the student as good as in a
//! clean run of the same fleet.

mod common;

use coevo::demo::{run_fleet_with, FleetRun};
use coevo_coordinator::config::{BelowQuorum, RoundPolicy};
use coevo_coordinator::strategy::StrategyConfig;
use coevo_coordinator::RoundReport;
use coevo_edge::Attack;
use coevo_models::data::synthetic;
use coevo_models::partition::{partition, PartitionSpec};
use coevo_models::DataSplit;
use std::path::Path;

const CLIENTS: usize = 6;
const ROUNDS: u64 = 2;
const SIGN_FLIP: &str = "cam-4";
const NAN: &str = "cam-5";

/// Two median rounds of the 6-client fleet in `out`, with the attackers on or off.
async fn run(data: &DataSplit, out: &Path, attackers: bool) -> Vec<RoundReport> {
    let parts = partition(
        &data.train.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: CLIENTS },
        5,
    )
    .expect("partition");
    let clients = common::ids(CLIENTS)
        .into_iter()
        .zip(&parts)
        .map(|(id, (_, idx))| (id, data.train.subset(idx)))
        .collect();
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
            c.aggregation = StrategyConfig::Median;
            // The NaN client is never accepted, so attacked rounds close at the deadline once
            // the 5 others are in; the extensions absorb a loaded machine.
            c.round = RoundPolicy {
                quorum: (CLIENTS - 1) as u32,
                timeout_s: 10,
                below_quorum: BelowQuorum::Extend,
                max_extensions: 3,
            };
        },
        |c| c,
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
