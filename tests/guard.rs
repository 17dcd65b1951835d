//! The model guard through the whole stack (issue #11, "no silent model death"): 4 agents
//! training for real over the embedded broker, one of them uploading its honest delta × 100
//! (well-formed and correctly signed, so only aggregation and the guard stand in its way).
//!
//! - Under plain FedAvg the merged model collapses: every round is `rolled_back` with the
//!   reason, the attacker is named (norm outlier and leave-one-out), and the model on disk is
//!   the last good one, byte for byte.
//! - Under the default configuration (norm clipping at 2 × the median) the same attacker is
//!   flagged and clipped, and the rounds complete with a working student.
//! - An honest FedAvg fleet is never rolled back and nobody is flagged.

mod common;

use coevo::demo::{run_fleet_with, FleetRun};
use coevo_coordinator::config::{BelowQuorum, RoundPolicy};
use coevo_coordinator::store::Store;
use coevo_coordinator::strategy::StrategyConfig;
use coevo_coordinator::RoundReport;
use coevo_edge::Attack;
use coevo_models::data::synthetic;
use coevo_models::DataSplit;
use std::path::Path;

const CLIENTS: usize = 4;
const ROUNDS: u64 = 2;
const ATTACKER: &str = "cam-3";

/// `ROUNDS` rounds of the 4-client fleet in `out`; `strategy` `None` keeps the default.
async fn run(
    data: &DataSplit,
    out: &Path,
    attacker: bool,
    strategy: Option<StrategyConfig>,
) -> Vec<RoundReport> {
    let clients = common::iid_clients(&data.train, CLIENTS);
    run_fleet_with(
        FleetRun {
            fleet: "guard",
            out,
            clients,
            test: data.test.shallow_clone(),
            seed: 3,
        },
        |c| {
            c.rounds = ROUNDS;
            if let Some(s) = strategy {
                c.aggregation = s;
            }
            // Every client is accepted, so a round closes as soon as the 4th is in; the
            // deadline only matters on a badly loaded machine.
            c.round = RoundPolicy {
                quorum: CLIENTS as u32,
                timeout_s: 60,
                below_quorum: BelowQuorum::Extend,
                max_extensions: 3,
            };
        },
        |c| c,
        |o| {
            if attacker && o.client_id == ATTACKER {
                o.attack = Some(Attack::Scale(100.0));
            }
        },
        &mut |_| {},
    )
    .await
    .expect("fleet run")
}

fn checkpoint(out: &Path, round: u64) -> Vec<u8> {
    let p = Store::new(out).checkpoint_path(round);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_rolls_back_a_boosted_delta_and_names_the_attacker() {
    common::init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("fedavg-attacked");
    let data = synthetic(1200, 300, common::SHAPE, 21);
    let reports = run(&data, &out, true, Some(StrategyConfig::FedAvg)).await;
    assert_eq!(reports.len(), ROUNDS as usize);
    for r in &reports {
        // Shown with --nocapture: the figures BENCHMARKS.md quotes.
        println!(
            "fedavg+attacker round {}: guard {}",
            r.round,
            serde_json::to_string(&r.guard).unwrap_or_default()
        );
        assert_eq!(r.outcome, "rolled_back", "round {}", r.round);
        assert_eq!(
            r.accepted, CLIENTS,
            "round {}: the boosted delta is well-formed",
            r.round
        );
        let g = r.guard.as_ref().expect("guard report");
        assert_eq!(g.verdict, "rolled_back");
        assert_eq!(
            g.data, "test",
            "fedavg without server data checks on the test split"
        );
        let (before, after) = (g.before.expect("before"), g.after.expect("after"));
        let reason = g.reason.as_deref().expect("a reason");
        assert!(
            reason.contains("loss") || reason.contains("accuracy"),
            "round {}: {reason}",
            r.round
        );
        assert!(
            after.accuracy < before.accuracy - 0.1
                || !after.loss.is_finite()
                || after.loss > before.loss * 2.0,
            "round {}: {before:?} → {after:?} is not a collapse",
            r.round
        );
        // Named twice over: its norm is an outlier, and leaving it out fixes the model.
        let named: Vec<&str> = g.offenders.iter().map(|o| o.client.as_str()).collect();
        assert_eq!(named, [ATTACKER], "round {}: {:?}", r.round, g.offenders);
        let evidence = &g.offenders[0].evidence;
        assert!(
            evidence.iter().any(|e| e.starts_with("norm-outlier"))
                && evidence.iter().any(|e| e.starts_with("leave-one-out")),
            "{evidence:?}"
        );
        let loo: Vec<(&str, bool)> = g
            .leave_one_out
            .iter()
            .map(|l| (l.client.as_str(), l.fixes))
            .collect();
        assert_eq!(loo.first(), Some(&(ATTACKER, true)), "{loo:?}");
        assert!(loo[1..].iter().all(|(_, fixes)| !fixes), "{loo:?}");
        let flagged: Vec<&str> = r.flagged.iter().map(|f| f.client.as_str()).collect();
        assert_eq!(flagged, [ATTACKER], "round {}", r.round);
        // The report's student is the published (last good) model, not the collapsed one.
        let published = r.student.test_accuracy.expect("student evaluated");
        assert!(
            (published - before.accuracy).abs() < 0.02,
            "round {}: published {published}, base {}",
            r.round,
            before.accuracy
        );
    }
    // Nothing collapsed was ever checkpointed: the model is still round 0's, byte for byte.
    assert_eq!(checkpoint(&out, ROUNDS), checkpoint(&out, 0));
    assert_eq!(checkpoint(&out, 1), checkpoint(&out, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_config_survives_the_attacker_and_honest_rounds_pass() {
    common::init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synthetic(1200, 300, common::SHAPE, 21);

    // Default aggregation (norm clipping at 2 × the median) with the same attacker.
    let attacked = run(&data, &dir.path().join("default-attacked"), true, None).await;
    assert_eq!(attacked.len(), ROUNDS as usize);
    for r in &attacked {
        println!(
            "default+attacker round {}: accuracy {:?}, clipped {:?}, flagged {:?}, guard {}",
            r.round,
            r.student.test_accuracy,
            r.clipped,
            r.flagged,
            serde_json::to_string(&r.guard).unwrap_or_default()
        );
        assert_eq!(r.strategy, "norm-clip");
        assert_eq!(r.outcome, "completed", "round {}: {:?}", r.round, r.guard);
        assert_eq!(r.guard.as_ref().map(|g| g.verdict.as_str()), Some("passed"));
        assert!(r.clipped.iter().any(|c| c == ATTACKER), "round {}", r.round);
        let flagged: Vec<&str> = r.flagged.iter().map(|f| f.client.as_str()).collect();
        assert_eq!(flagged, [ATTACKER], "round {}", r.round);
    }
    let acc = attacked[1].student.test_accuracy.expect("evaluated");
    // The synthetic classes are easy: a working fleet is far above chance (0.1) after 2 rounds.
    assert!(acc > 0.5, "default config under attack reached only {acc}");

    // Honest FedAvg: never rolled back, nobody flagged.
    let clean = run(
        &data,
        &dir.path().join("fedavg-clean"),
        false,
        Some(StrategyConfig::FedAvg),
    )
    .await;
    for r in &clean {
        println!(
            "fedavg clean round {}: accuracy {:?}, guard {}",
            r.round,
            r.student.test_accuracy,
            serde_json::to_string(&r.guard).unwrap_or_default()
        );
        assert_eq!(r.outcome, "completed", "round {}: {:?}", r.round, r.guard);
        let g = r.guard.as_ref().expect("guard report");
        assert_eq!(g.verdict, "passed");
        assert!(g.offenders.is_empty() && g.leave_one_out.is_empty());
        assert!(r.flagged.is_empty(), "round {}: {:?}", r.round, r.flagged);
    }
    let clean_acc = clean[1].student.test_accuracy.expect("evaluated");
    assert!(clean_acc > 0.5, "clean fedavg reached only {clean_acc}");
}
