//! In-process research simulation of the co-evolution bench (no MQTT): finds and measures the
//! teacher ⇄ student algorithm before it is wired into the coordinator.
//!
//! ```text
//! cargo run -p coevo-models --example coevolution_sim -- [--data DIR] [--rounds 20] [--seed 1]
//!     [--clients-per-round 10] [--local-epochs 2] [--local-batch 16] [--local-lr 0.05]
//!     [--modes fedavg,coevolve] [--threads 1]
//!     [--fuse-epochs 1] [--fuse-temp 3] [--fuse-alpha 0.7] [--fuse-lr 0.02] [--fuse-augment]
//!     [--ensemble clients|merged] [--fuse-eps 0] [--fuse-guard best|old] [--fuse-conf 0]
//!     [--weighted] [--server-labelled 10] [--server-unlabelled 20] [--val-writers 10]
//!     [--distill-epochs 2] [--distill-temp 3] [--distill-alpha 0.7] [--distill-lr 0.02]
//!     [--distill-eps 0] [--lower-epochs 40] [--upper-epochs 6] [--no-upper] [--cache DIR]
//!     [--speed]
//! ```
//!
//! `--threads 1` is the default because on a shared 2-core machine libtorch's intra-op threads
//! contend with other processes (measured: teacher training 359 samples/s with 1 thread vs 86
//! with 2 under load). `--speed` only prints training throughput and exits.
//!
//! Split (by writer, shuffled with `--seed`): server labelled = `--server-labelled` writers
//! (all their samples: "the labelled set", which is all the lower bound and the coevolve
//! teacher's CE ever see); validation = `--val-writers` (10) other whole writers nobody trains
//! on, used by both guards (`--val-writers 0` = the pre-#12 20 % of the labelled writers' own
//! samples, which leaks on near-duplicate camera frames); server unlabelled pool =
//! `--server-unlabelled` other writers (labels never read); clients = the remaining writers, one
//! client per writer; test = all of the test split.
//!
//! - lower bound: teacher trained on the labelled set only (this is also the coevolve teacher's
//!   starting point: the data centre starts with what it has);
//! - upper bound: teacher trained centrally on all training data;
//! - fedavg: student only, samples-weighted FedAvg of local SGD;
//! - coevolve: per round, distil teacher → student (warm start from the last merged student,
//!   guarded), the same local training and FedAvg as fedavg, then fuse the merged student +
//!   client students into the teacher on the pool + CE on the labelled set (guarded with ε).
//!
//! Bounds are cached in `--cache` (default `/tmp/coevo-sim`) per seed and epochs, since every
//! variant shares them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use coevo_models::distill::{self, Ensemble, GuardOutcome, KdConfig, Soft};
use coevo_models::partition::{partition, PartitionSpec};
use coevo_models::train::{evaluate, train, TrainConfig};
use coevo_models::{
    data, net, DataShape, Dataset, ModelError, NetKind, Student, Teacher, WeightCodec, Weights,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::nn;
use tch::{Device, Tensor};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args(BTreeMap<String, String>);

impl Args {
    fn parse() -> Args {
        let mut m = BTreeMap::new();
        let mut it = std::env::args().skip(1).peekable();
        while let Some(a) = it.next() {
            let key = a.trim_start_matches("--").to_string();
            let val = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().unwrap_or_default(),
                _ => "true".into(),
            };
            m.insert(key, val);
        }
        Args(m)
    }
    fn get<T: std::str::FromStr>(&self, k: &str, d: T) -> T {
        self.0.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
    }
    fn s(&self, k: &str, d: &str) -> String {
        self.0.get(k).cloned().unwrap_or_else(|| d.into())
    }
}

struct Split {
    labelled: Dataset,
    val: Dataset,
    pool: Tensor,
    server_images: Tensor,
    clients: Vec<Dataset>,
    train_all: Dataset,
    test: Dataset,
}

fn split(dir: &Path, seed: u64, n_lab: usize, n_pool: usize, n_val: usize) -> Res<Split> {
    let d = data::load_dir(dir)?;
    let labels = d.train.labels_vec();
    let parts = partition(
        &labels,
        d.train.clients.as_deref(),
        &PartitionSpec::Natural,
        seed,
    )?;
    let mut writers: Vec<usize> = (0..parts.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    writers.shuffle(&mut rng);
    let take = |ws: &[usize]| -> Vec<usize> {
        let mut v: Vec<usize> = ws
            .iter()
            .flat_map(|&w| parts[w].1.iter().copied())
            .collect();
        v.sort_unstable();
        v
    };
    let mut lab_idx = take(&writers[..n_lab]);
    // Validation: whole writers nobody trains on (n_val > 0), or the old 20 % of the labelled
    // writers' own samples (n_val = 0), which on near-duplicate frames leaks.
    let (val, labelled, rest) = if n_val > 0 {
        (
            d.train.subset(&take(&writers[n_lab..n_lab + n_val])),
            d.train.subset(&lab_idx),
            n_lab + n_val,
        )
    } else {
        lab_idx.shuffle(&mut rng);
        let n = lab_idx.len() / 5;
        (
            d.train.subset(&lab_idx[..n]),
            d.train.subset(&lab_idx[n..]),
            n_lab,
        )
    };
    let pool = d.train.subset(&take(&writers[rest..rest + n_pool])).images;
    let clients = writers[rest + n_pool..]
        .iter()
        .map(|&w| d.train.subset(&parts[w].1))
        .collect();
    let server_images = Tensor::cat(&[&labelled.images, &pool], 0);
    Ok(Split {
        labelled,
        val,
        pool,
        server_images,
        clients,
        train_all: d.train,
        test: d.test,
    })
}

fn teacher_cfg(epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        lr: 0.02,
        momentum: 0.9,
        prox_mu: 0.0,
        seed,
    }
}

/// Trains (or loads from the cache) a teacher on `data`; returns its weights.
fn cached_teacher(
    cache: &Path,
    name: &str,
    shape: &DataShape,
    data: &Dataset,
    epochs: usize,
    seed: u64,
) -> Res<Weights> {
    std::fs::create_dir_all(cache)?;
    let file = cache.join(format!("{name}-s{seed}-e{epochs}.safetensors"));
    if let Ok(bytes) = std::fs::read(&file) {
        return Ok(Weights::decode(&bytes, WeightCodec::F32, 1 << 30)?);
    }
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let t = Teacher::new(&vs.root(), shape);
    let t0 = Instant::now();
    train(&t, &vs, data, &teacher_cfg(epochs, seed))?;
    println!(
        "  trained {name} teacher: {} samples × {epochs} epochs in {:.1}s",
        data.len(),
        t0.elapsed().as_secs_f64()
    );
    let w = Weights::from_var_store(&vs);
    std::fs::write(&file, w.encode(WeightCodec::F32)?)?;
    Ok(w)
}

fn teacher_acc(shape: &DataShape, w: &Weights, test: &Dataset) -> Res<f64> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let t = Teacher::new(&vs.root(), shape);
    w.load_into(&mut vs)?;
    Ok(evaluate(&t, test, 500).accuracy)
}

/// One round of client training from `global`: returns the client students and the merge.
fn client_round(
    shape: &DataShape,
    global: &Weights,
    clients: &[&Dataset],
    local: &TrainConfig,
    round: usize,
) -> Result<(Vec<Weights>, Weights), ModelError> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = Student::new(&vs.root(), shape);
    let mut merged = global.zeros_like();
    let total: usize = clients.iter().map(|c| c.len()).sum();
    let mut outs = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        global.load_into(&mut vs)?;
        let cfg = TrainConfig {
            seed: (round * 1000 + i) as u64,
            ..local.clone()
        };
        train(&net, &vs, c, &cfg)?;
        let w = Weights::from_var_store(&vs);
        merged.add_scaled(&w, c.len() as f32 / total as f32)?;
        outs.push(w);
    }
    Ok((outs, merged))
}

fn sample_clients(all: &[Dataset], k: usize, seed: u64, round: usize) -> Vec<&Dataset> {
    let mut idx: Vec<usize> = (0..all.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(7919).wrapping_add(round as u64));
    idx.shuffle(&mut rng);
    let mut chosen: Vec<usize> = idx.into_iter().take(k.min(all.len())).collect();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| &all[i]).collect()
}

fn student_acc(shape: &DataShape, w: &Weights, test: &Dataset) -> Result<f64, ModelError> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let s = Student::new(&vs.root(), shape);
    w.load_into(&mut vs)?;
    Ok(evaluate(&s, test, 1000).accuracy)
}

fn short(g: &GuardOutcome) -> String {
    match g {
        GuardOutcome::Accepted { before, after, .. } => {
            format!("acc {before:.3}->{after:.3}")
        }
        GuardOutcome::RolledBack {
            before,
            after,
            best,
            reason,
        } => format!("ROLLBACK {before:.3}->{after:.3} (best {best:.3}: {reason})"),
    }
}

fn main() -> Res<()> {
    let a = Args::parse();
    let dir = PathBuf::from(a.s("data", "/work/shared/data/femnist"));
    let rounds: usize = a.get("rounds", 20);
    let seed: u64 = a.get("seed", 1);
    let cpr: usize = a.get("clients-per-round", 10);
    let modes = a.s("modes", "fedavg,coevolve");
    let cache = PathBuf::from(a.s("cache", "/tmp/coevo-sim"));
    let lower_epochs: usize = a.get("lower-epochs", 40);
    let upper_epochs: usize = a.get("upper-epochs", 6);
    let threads: i32 = a.get("threads", 1);
    tch::set_num_threads(threads);
    let local = TrainConfig {
        epochs: a.get("local-epochs", 2),
        batch_size: a.get("local-batch", 16),
        lr: a.get("local-lr", 0.05),
        momentum: 0.9,
        prox_mu: 0.0,
        seed: 0,
    };
    let fuse_cfg = KdConfig {
        temperature: a.get("fuse-temp", 3.0),
        alpha: a.get("fuse-alpha", 0.7),
        epochs: a.get("fuse-epochs", 1),
        batch_size: 64,
        lr: a.get("fuse-lr", 0.02),
        momentum: 0.9,
        weight_decay: 5e-4,
        augment: a.0.contains_key("fuse-augment"),
        seed,
        min_confidence: a.get("fuse-conf", 0.0),
    };
    let distill_cfg = KdConfig {
        temperature: a.get("distill-temp", 3.0),
        alpha: a.get("distill-alpha", 0.7),
        epochs: a.get("distill-epochs", 2),
        batch_size: 64,
        lr: a.get("distill-lr", 0.02),
        momentum: 0.9,
        weight_decay: 0.0,
        augment: false,
        seed,
        min_confidence: 0.0,
    };
    let fuse_eps: f64 = a.get("fuse-eps", 0.0);
    // "old": one guarded fusion of all epochs against the previous teacher (the algorithm
    // before issue #12); "best": early-stopped epochs, guarded against the best teacher so far.
    let fuse_mode = a.s("fuse-guard", "best");
    let weighted = a.0.contains_key("weighted");
    let distill_eps: f64 = a.get("distill-eps", 0.0);
    let ensemble_mode = a.s("ensemble", "clients");

    let t0 = Instant::now();
    let sp = split(
        &dir,
        seed,
        a.get("server-labelled", 10),
        a.get("server-unlabelled", 20),
        a.get("val-writers", 10),
    )?;
    let shape = sp.train_all.shape;
    println!(
        "split seed {seed}: labelled {} / val {} / pool {} / {} clients ({} samples) / test {}; loaded in {:.1}s",
        sp.labelled.len(),
        sp.val.len(),
        sp.pool.size()[0],
        sp.clients.len(),
        sp.clients.iter().map(Dataset::len).sum::<usize>(),
        sp.test.len(),
        t0.elapsed().as_secs_f64()
    );
    {
        let svs = nn::VarStore::new(Device::Cpu);
        let _s = Student::new(&svs.root(), &shape);
        let tvs = nn::VarStore::new(Device::Cpu);
        let _t = Teacher::new(&tvs.root(), &shape);
        let (sp_, tp) = (net::param_count(&svs), net::param_count(&tvs));
        let (sf, tf) = (
            net::flops_per_image(NetKind::Student, &shape),
            net::flops_per_image(NetKind::Teacher, &shape),
        );
        println!("student {sp_} params {sf} MACs; teacher {tp} params {tf} MACs; ratios {:.1}x params {:.2}x MACs", tp as f64 / sp_ as f64, tf as f64 / sf as f64);
    }

    if a.0.contains_key("speed") {
        for (name, bs) in [
            ("student", 16usize),
            ("student", 64),
            ("teacher", 32),
            ("teacher", 128),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let cfg = TrainConfig {
                batch_size: bs,
                ..teacher_cfg(1, 0)
            };
            let t = Instant::now();
            if name == "student" {
                let m = Student::new(&vs.root(), &shape);
                train(&m, &vs, &sp.labelled, &cfg)?;
            } else {
                let m = Teacher::new(&vs.root(), &shape);
                train(&m, &vs, &sp.labelled, &cfg)?;
            }
            println!(
                "{name} batch {bs}: {:.0} samples/s",
                sp.labelled.len() as f64 / t.elapsed().as_secs_f64()
            );
        }
        return Ok(());
    }
    let tb = Instant::now();
    let lower_name = format!("lower-v{}", a.get::<usize>("val-writers", 10));
    let lower_w = cached_teacher(
        &cache,
        &lower_name,
        &shape,
        &sp.labelled,
        lower_epochs,
        seed,
    )?;
    let lower = teacher_acc(&shape, &lower_w, &sp.test)?;
    let upper = if a.0.contains_key("no-upper") {
        f64::NAN
    } else {
        let w = cached_teacher(&cache, "upper", &shape, &sp.train_all, upper_epochs, seed)?;
        teacher_acc(&shape, &w, &sp.test)?
    };
    println!(
        "lower_bound {lower:.4}  upper_bound {upper:.4}  ({:.1}s)",
        tb.elapsed().as_secs_f64()
    );

    tch::manual_seed(seed as i64);
    let init = {
        let vs = nn::VarStore::new(Device::Cpu);
        let _s = Student::new(&vs.root(), &shape);
        Weights::from_var_store(&vs)
    };

    let mut fedavg_final = f64::NAN;
    if modes.contains("fedavg") {
        let mut global = init.clone();
        let tf = Instant::now();
        for r in 0..rounds {
            let chosen = sample_clients(&sp.clients, cpr, seed, r);
            let (_, merged) = client_round(&shape, &global, &chosen, &local, r)?;
            global = merged;
            fedavg_final = student_acc(&shape, &global, &sp.test)?;
            println!(
                "fedavg r{r:02} student {fedavg_final:.4}  ({:.1}s/round)",
                tf.elapsed().as_secs_f64() / (r + 1) as f64
            );
        }
    }

    if modes.contains("coevolve") {
        let mut tvs = nn::VarStore::new(Device::Cpu);
        let teacher = Teacher::new(&tvs.root(), &shape);
        lower_w.load_into(&mut tvs)?;
        let mut svs = nn::VarStore::new(Device::Cpu);
        let student = Student::new(&svs.root(), &shape);
        let mut global = init.clone();
        let tc = Instant::now();
        let (mut t_acc, mut s_acc) = (lower, 0.0);
        // The teacher only changes when a fusion is accepted: its logits and test accuracy are
        // recomputed only then (saves a teacher pass over server data and test set per rollback).
        let mut t_logits = distill::logits(&teacher, &sp.server_images, 500)?;
        let mut t_val: Option<f64> = None;
        let mut t_best: Option<f64> = None;
        let mut phase = [0.0f64; 4];
        for r in 0..rounds {
            let tp = Instant::now();
            // 1. Downward: teacher → student on server data, warm-started from the merged student.
            global.load_into(&mut svs)?;
            let dcfg = KdConfig {
                seed: seed + r as u64,
                ..distill_cfg.clone()
            };
            let (d_out, _) =
                distill::guard_update(&student, &mut svs, &sp.val, distill_eps, None, |vs| {
                    distill::distill(
                        &student,
                        vs,
                        &sp.server_images,
                        Soft::Logits(&t_logits),
                        Some(&sp.labelled),
                        &dcfg,
                    )
                })?;
            let sent = Weights::from_var_store(&svs);
            phase[0] += tp.elapsed().as_secs_f64();
            let tp = Instant::now();
            // 2. Clients fine-tune, 3. FedAvg.
            let chosen = sample_clients(&sp.clients, cpr, seed, r);
            let (client_ws, merged) = client_round(&shape, &sent, &chosen, &local, r)?;
            global = merged;
            phase[1] += tp.elapsed().as_secs_f64();
            let tp = Instant::now();
            // 4. Upward fusion into the teacher.
            let mut members: Vec<&Weights> = vec![&global];
            if ensemble_mode == "clients" {
                members.extend(client_ws.iter());
            }
            let fcfg = KdConfig {
                seed: seed + r as u64,
                ..fuse_cfg.clone()
            };
            let weights = if weighted {
                distill::quality_weights(&distill::member_accuracies(&shape, &members, &sp.val)?)
            } else {
                vec![1.0; members.len()]
            };
            let ens_online;
            let ens_fixed;
            let f;
            let soft = if fuse_cfg.augment {
                ens_online = Ensemble::weighted(NetKind::Student, &shape, &members, &weights)?;
                f = |x: &Tensor| ens_online.logits(x);
                Soft::Model(&f)
            } else {
                ens_fixed =
                    distill::weighted_ensemble_logits(&shape, &members, &weights, &sp.pool, 1000)?;
                Soft::Logits(&ens_fixed)
            };
            let f_out = if fuse_mode == "old" {
                distill::guard_update(&teacher, &mut tvs, &sp.val, fuse_eps, t_val, |vs| {
                    distill::fuse(&teacher, vs, &sp.pool, soft, Some(&sp.labelled), &fcfg)
                })?
                .0
            } else {
                distill::fuse_guarded(
                    &teacher,
                    &mut tvs,
                    &sp.val,
                    &sp.pool,
                    soft,
                    Some(&sp.labelled),
                    &fcfg,
                    fuse_eps,
                    t_val,
                    t_best,
                )?
                .0
            };
            t_val = Some(f_out.kept());
            t_best = Some(t_best.map_or(f_out.kept(), |b: f64| b.max(f_out.kept())));
            phase[2] += tp.elapsed().as_secs_f64();
            let tp = Instant::now();
            if f_out.accepted() {
                t_acc = evaluate(&teacher, &sp.test, 500).accuracy;
                t_logits = distill::logits(&teacher, &sp.server_images, 500)?;
            }
            s_acc = student_acc(&shape, &global, &sp.test)?;
            phase[3] += tp.elapsed().as_secs_f64();
            let gap = (t_acc - lower) / (upper - lower);
            println!(
                "coevolve r{r:02} teacher {t_acc:.4} student {s_acc:.4} gap_closed {gap:.3} | distill {} fuse {} ({:.1}s/round)",
                short(&d_out),
                short(&f_out),
                tc.elapsed().as_secs_f64() / (r + 1) as f64
            );
        }
        println!(
            "phase seconds: distill {:.0} clients {:.0} fuse {:.0} eval {:.0}",
            phase[0], phase[1], phase[2], phase[3]
        );
        println!(
            "SUMMARY lower {lower:.4} upper {upper:.4} fedavg_student {fedavg_final:.4} coevolve_teacher {t_acc:.4} coevolve_student {s_acc:.4} gap_closed {:.3} total {:.0}s",
            (t_acc - lower) / (upper - lower),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
