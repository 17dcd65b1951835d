//! The teacher side of co-evolution (DESIGN §5.1 and §5.6): the data centre's teacher distils
//! into the student before each round, and learns back from the merged and client students
//! after it, each step guarded by validation accuracy.
//!
//! All of it is blocking libtorch work; the round loop runs it on a blocking thread.

use crate::CoordinatorError;
use coevo_models::distill::{
    distill, fuse_guarded, guard_update, logits, member_accuracies_of, quality_weights,
    weighted_ensemble_logits_of, Ensemble, GuardOutcome, KdConfig, Soft,
};
use coevo_models::train::{evaluate, train, Evaluation, TrainConfig};
use coevo_models::{Arch, DataShape, Dataset, Net, Weights};
use serde::{Deserialize, Serialize};

/// Which loop the coordinator runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Student-only federated averaging: the classic baseline.
    Fedavg,
    /// Teacher ⇄ student co-evolution: distil before each round, fuse after it. The default:
    /// it is what coevo is for (the server keeps `[server_data]` of its dataset).
    #[default]
    Coevolve,
}

/// The server's own data, by role.
pub struct ServerData {
    /// Labelled: the teacher's cross-entropy set.
    pub labelled: Dataset,
    /// Unlabelled pool: where the teacher learns from the students' ensemble.
    pub unlabelled: Dataset,
    /// Held out: the guards' yardstick.
    pub validation: Dataset,
}

/// Co-evolution hyper-parameters (coordinator config `[coevolution]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoevolutionConfig {
    /// Epochs of cross-entropy on the labelled set before round 1 (the teacher's start).
    pub pretrain_epochs: usize,
    pub pretrain_lr: f64,
    /// Downward knowledge distillation, teacher → student.
    pub distill: KdConfig,
    /// Largest validation drop accepted from distillation.
    pub distill_epsilon: f64,
    /// Upward ensemble distillation, students → teacher. `fuse.epochs` is a maximum: fusion
    /// stops at the first epoch that does not improve validation accuracy and keeps the best.
    pub fuse: KdConfig,
    /// Largest drop below the **best teacher so far** (validation accuracy) a fusion may cause
    /// and still be kept; 0 = a fusion is kept only if it at least matches the best teacher.
    pub fuse_epsilon: f64,
    /// Weight the fusion ensemble's members by their validation accuracy (members below half
    /// the best member left out) instead of uniformly (see `distill::quality_weights`).
    pub fuse_weighted: bool,
    /// Client students (global + Δk) in the fusion ensemble besides the merged student,
    /// sampled per round. Each costs a student forward pass over the pool, so with a large
    /// fleet "all of them" would dominate the round; `0` = the merged student alone.
    pub ensemble_clients: usize,
    /// A camera whose signed estimate of its label noise is above this is left out of the
    /// round's merge and of the teacher's fusion (issue #18, [`crate::labels`]); applies in
    /// both modes, to cameras that send an estimate (`[labels]` in their `edge.toml`).
    pub max_client_noise: f64,
    /// Multiply the other cameras' FedAvg and fusion weights by `1 − estimated noise`.
    pub label_weighting: bool,
}

impl Default for CoevolutionConfig {
    fn default() -> Self {
        CoevolutionConfig {
            pretrain_epochs: 40,
            pretrain_lr: 0.02,
            distill: KdConfig::default(),
            distill_epsilon: 0.0,
            // Fusion keeps half its weight on the labelled cross-entropy and skips targets the
            // ensemble is unsure of: with 43 classes and weak members, α = 0.7 on every target
            // pulled the teacher's logits flat (issue #12).
            fuse: KdConfig {
                epochs: 1,
                alpha: 0.5,
                min_confidence: 0.5,
                ..KdConfig::default()
            },
            fuse_epsilon: 0.0,
            fuse_weighted: true,
            ensemble_clients: 8,
            // Half the labels wrong: what the edge can no longer clean by itself.
            max_client_noise: 0.5,
            label_weighting: true,
        }
    }
}

impl CoevolutionConfig {
    /// The teacher's supervised recipe: its pretraining on the labelled set, and the benches'
    /// upper bound on all data, so the two bounds differ only in data and epochs.
    pub fn teacher_training(&self, epochs: usize, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: 32,
            lr: self.pretrain_lr,
            momentum: 0.9,
            prox_mu: 0.0,
            seed,
        }
    }
}

/// The round report's parts ([`coevo_ops`], readable without libtorch).
pub use coevo_ops::report::{CoevolutionReport, FusionMember};

/// The teacher, a scratch student for distillation, and the server data.
pub struct TeacherLoop {
    shape: DataShape,
    teacher_vs: tch::nn::VarStore,
    teacher: Net,
    student_vs: tch::nn::VarStore,
    student: Net,
    /// The student's architecture (built-in or TorchScript): what the fusion ensemble builds.
    student_arch: Arch,
    /// The teacher's: what pretraining re-initialises from.
    teacher_arch: Arch,
    data: ServerData,
    /// Labelled and unlabelled images together: the distillation transfer set.
    transfer: tch::Tensor,
    cfg: CoevolutionConfig,
    /// The teacher's logits on `transfer`, valid until the teacher changes (a rolled-back
    /// fusion leaves it as it was, so the next distillation reuses them).
    transfer_logits: Option<tch::Tensor>,
    /// The teacher's validation accuracy, valid until it changes.
    val_accuracy: Option<f64>,
    /// The best validation accuracy any kept teacher had: the fusion guard's yardstick.
    best_val: Option<f64>,
    /// The last test evaluation (and the test set's size), valid until the teacher changes.
    test_eval: Option<(usize, Evaluation)>,
}

impl TeacherLoop {
    pub fn new(
        shape: DataShape,
        data: ServerData,
        cfg: CoevolutionConfig,
    ) -> Result<Self, CoordinatorError> {
        Self::with_archs(shape, data, cfg, Arch::student(), Arch::teacher())
    }

    /// [`TeacherLoop::new`] with the student and teacher architectures (e.g. TorchScript
    /// modules, `[model]` in the coordinator config); both must fit `shape`.
    pub fn with_archs(
        shape: DataShape,
        data: ServerData,
        cfg: CoevolutionConfig,
        student_arch: Arch,
        teacher_arch: Arch,
    ) -> Result<Self, CoordinatorError> {
        if data.labelled.is_empty() || data.validation.is_empty() {
            return Err(CoordinatorError::Config(
                "coevolve mode needs a non-empty labelled and validation set".into(),
            ));
        }
        let teacher_vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let teacher = teacher_arch.build(&teacher_vs.root(), &shape)?;
        let student_vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let student = student_arch.build(&student_vs.root(), &shape)?;
        let transfer = if data.unlabelled.is_empty() {
            data.labelled.images.shallow_clone()
        } else {
            tch::Tensor::cat(&[&data.labelled.images, &data.unlabelled.images], 0)
        };
        Ok(TeacherLoop {
            shape,
            teacher_vs,
            teacher,
            student_vs,
            student,
            student_arch,
            teacher_arch,
            data,
            transfer,
            cfg,
            transfer_logits: None,
            val_accuracy: None,
            best_val: None,
            test_eval: None,
        })
    }

    /// Forgets everything computed from the current teacher weights.
    fn teacher_changed(&mut self) {
        self.transfer_logits = None;
        self.val_accuracy = None;
        self.test_eval = None;
    }

    /// Trains the teacher on the labelled set: where it starts, and the benches' lower bound.
    ///
    /// A pure function of (labelled set, config, `seed`): the initial weights are drawn right
    /// here from libtorch's generator seeded with `seed`, and training re-seeds it, so however
    /// much randomness the caller used before (the coordinator builds its student first, the
    /// bench does not), the pretrained teacher is byte-identical — the lower bound *is* the
    /// co-evolved teacher's round-0 checkpoint.
    pub fn pretrain(&mut self, seed: u64) -> Result<Evaluation, CoordinatorError> {
        tch::manual_seed(seed as i64);
        let init = {
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let _fresh = self.teacher_arch.build(&vs.root(), &self.shape)?;
            Weights::from_var_store(&vs)
        };
        init.load_into(&mut self.teacher_vs)?;
        tch::manual_seed(seed.wrapping_add(1) as i64);
        let cfg = self.cfg.teacher_training(self.cfg.pretrain_epochs, seed);
        train(&self.teacher, &self.teacher_vs, &self.data.labelled, &cfg)?;
        self.teacher_changed();
        let eval = evaluate(&self.teacher, &self.data.validation, 512);
        self.val_accuracy = Some(eval.accuracy);
        self.best_val = Some(eval.accuracy);
        Ok(eval)
    }

    pub fn teacher_weights(&self) -> Weights {
        Weights::from_var_store(&self.teacher_vs)
    }

    pub fn load_teacher(&mut self, w: &Weights) -> Result<(), CoordinatorError> {
        w.load_into(&mut self.teacher_vs)?;
        self.teacher_changed();
        // A resumed teacher was kept by the guard, so it was the best at the time.
        let acc = evaluate(&self.teacher, &self.data.validation, 512).accuracy;
        self.val_accuracy = Some(acc);
        self.best_val = Some(self.best_val.map_or(acc, |b| b.max(acc)));
        Ok(())
    }

    /// The teacher's validation accuracy (computed once per teacher version).
    fn teacher_val(&mut self) -> f64 {
        *self
            .val_accuracy
            .get_or_insert_with(|| evaluate(&self.teacher, &self.data.validation, 512).accuracy)
    }

    /// Student ← KD(teacher), warm-started from `global`; returns the student to publish
    /// (`global` itself if the guard rolled distillation back).
    pub fn distill_into(
        &mut self,
        global: &Weights,
    ) -> Result<(Weights, GuardOutcome), CoordinatorError> {
        global.load_into(&mut self.student_vs)?;
        let teacher_logits = match self.transfer_logits.take() {
            Some(l) => l,
            None => logits(&self.teacher, &self.transfer, 256)?,
        };
        let (outcome, _) = guard_update(
            &self.student,
            &mut self.student_vs,
            &self.data.validation,
            self.cfg.distill_epsilon,
            None,
            |vs| {
                distill(
                    &self.student,
                    vs,
                    &self.transfer,
                    Soft::Logits(&teacher_logits),
                    Some(&self.data.labelled),
                    &self.cfg.distill,
                )
            },
        )?;
        self.transfer_logits = Some(teacher_logits);
        Ok((Weights::from_var_store(&self.student_vs), outcome))
    }

    /// Teacher learns from the ensemble of `members` (merged student and client students) on
    /// the unlabelled pool, plus cross-entropy on the labelled set. Members are weighted by
    /// their validation accuracy (`fuse_weighted`), low-confidence targets are skipped
    /// (`fuse.min_confidence`), the best of up to `fuse.epochs` epochs is kept, and only if it
    /// is within `fuse_epsilon` of the best teacher so far on the held-out validation set.
    /// `round` varies batch order and augmentation from round to round.
    pub fn fuse_from(
        &mut self,
        members: &[&Weights],
        round: u64,
    ) -> Result<GuardOutcome, CoordinatorError> {
        let ones = vec![1.0; members.len()];
        Ok(self.fuse_from_weighted(members, &ones, round)?.0)
    }

    /// [`TeacherLoop::fuse_from`] with each member's weight also multiplied by
    /// `label_factors` (1 − its camera's estimated label noise); returns each member's
    /// validation accuracy and final normalised weight besides the outcome.
    pub fn fuse_from_weighted(
        &mut self,
        members: &[&Weights],
        label_factors: &[f64],
        round: u64,
    ) -> Result<(GuardOutcome, Vec<f64>, Vec<f64>), CoordinatorError> {
        if label_factors.len() != members.len() {
            return Err(CoordinatorError::Config(format!(
                "{} label factors for {} fusion members",
                label_factors.len(),
                members.len()
            )));
        }
        let cfg = KdConfig {
            seed: self.cfg.fuse.seed.wrapping_add(round),
            ..self.cfg.fuse.clone()
        };
        let before = self.teacher_val();
        let best = self.best_val.unwrap_or(before).max(before);
        let accuracies = member_accuracies_of(
            &self.student_arch,
            &self.shape,
            members,
            &self.data.validation,
        )?;
        let weights: Vec<f64> = if self.cfg.fuse_weighted {
            quality_weights(&accuracies)
        } else {
            vec![1.0; members.len()]
        }
        .iter()
        .zip(label_factors)
        .map(|(w, f)| w * f.clamp(0.0, 1.0))
        .collect();
        let total: f64 = weights.iter().sum();
        let shares: Vec<f64> = weights
            .iter()
            .map(|w| if total > 0.0 { w / total } else { 0.0 })
            .collect();
        let pool = if self.data.unlabelled.is_empty() {
            &self.data.labelled.images
        } else {
            &self.data.unlabelled.images
        };
        // With augmentation every batch is a new view of the pool, so the ensemble is asked
        // online; without it, its logits are computed once.
        let (ensemble, once);
        let online;
        let soft = if cfg.augment {
            ensemble = Ensemble::weighted(&self.student_arch, &self.shape, members, &weights)?;
            online = |x: &tch::Tensor| ensemble.logits(x);
            Soft::Model(&online)
        } else {
            once = weighted_ensemble_logits_of(
                &self.student_arch,
                &self.shape,
                members,
                &weights,
                pool,
                256,
            )?;
            Soft::Logits(&once)
        };
        let (outcome, _) = fuse_guarded(
            &self.teacher,
            &mut self.teacher_vs,
            &self.data.validation,
            pool,
            soft,
            Some(&self.data.labelled),
            &cfg,
            self.cfg.fuse_epsilon,
            Some(before),
            Some(best),
        )?;
        if outcome.accepted() {
            self.teacher_changed();
            self.val_accuracy = Some(outcome.kept());
            self.best_val = Some(best.max(outcome.kept()));
        }
        Ok((outcome, accuracies, shares))
    }

    /// The teacher's accuracy on `test`; reused while the teacher is unchanged (a rolled-back
    /// fusion), so a round without a new teacher costs no teacher pass over the test set.
    /// The cache is keyed by the test set's size: the coordinator and the benches use one.
    pub fn evaluate_teacher(&mut self, test: &Dataset) -> Evaluation {
        if let Some((n, e)) = &self.test_eval {
            if *n == test.len() {
                return e.clone();
            }
        }
        let e = evaluate(&self.teacher, test, 512);
        self.test_eval = Some((test.len(), e.clone()));
        e
    }
}

/// Splits a training set into the server's roles — by writer id when `cfg.labelled_clients`
/// is set, else by fraction after a seeded shuffle; returns them and the indices left for the
/// clients.
pub fn split_server_data(
    train: &Dataset,
    cfg: &crate::config::ServerDataConfig,
    seed: u64,
) -> Result<(ServerData, Vec<usize>), CoordinatorError> {
    if cfg.by_clients() {
        split_by_clients(train, cfg, seed)
    } else {
        Ok(split_by_fraction(train, cfg, seed))
    }
}

/// Roles by writer id (the dataset's clients file); unknown ids are an error, not skipped,
/// because a typo would silently shrink the teacher's data.
fn split_by_clients(
    train: &Dataset,
    cfg: &crate::config::ServerDataConfig,
    seed: u64,
) -> Result<(ServerData, Vec<usize>), CoordinatorError> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let writers = train.clients.as_ref().ok_or_else(|| {
        CoordinatorError::Config(
            "server_data by client id needs a dataset with a clients file".into(),
        )
    })?;
    let mut by_writer: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for (i, w) in writers.iter().enumerate() {
        by_writer.entry(w.as_str()).or_default().push(i);
    }
    let collect = |ids: &[String]| -> Result<Vec<usize>, CoordinatorError> {
        let mut out = Vec::new();
        for id in ids {
            let rows = by_writer.get(id.as_str()).ok_or_else(|| {
                CoordinatorError::Config(format!(
                    "server_data: client {id:?} is not in the dataset's clients file"
                ))
            })?;
            out.extend_from_slice(rows);
        }
        out.sort_unstable();
        Ok(out)
    };
    let unlabelled = collect(&cfg.unlabelled_clients)?;
    // Validation is whole writers the teacher never trains on: frames of one camera are
    // near-copies of each other, so holding out some of a labelled camera's frames measures
    // memory, not generalisation (issue #12: 0.88 on such a set, 0.56 on test). Without explicit
    // `validation_clients`, `validation_holdout` of the labelled writers (at least one when
    // there are two or more) are held out whole.
    let (labelled, validation) = if cfg.validation_clients.is_empty() {
        let mut ids = cfg.labelled_clients.clone();
        ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let n = ids.len();
        let mut n_val = ((n as f64) * cfg.validation_holdout).round() as usize;
        if n >= 2 && cfg.validation_holdout > 0.0 {
            n_val = n_val.clamp(1, n - 1);
        } else {
            n_val = 0;
        }
        let (val_ids, lab_ids) = ids.split_at(n_val);
        (collect(lab_ids)?, collect(val_ids)?)
    } else {
        (
            collect(&cfg.labelled_clients)?,
            collect(&cfg.validation_clients)?,
        )
    };
    let server: std::collections::HashSet<&str> = cfg
        .labelled_clients
        .iter()
        .chain(&cfg.unlabelled_clients)
        .chain(&cfg.validation_clients)
        .map(String::as_str)
        .collect();
    let rest = (0..writers.len())
        .filter(|&i| !server.contains(writers[i].as_str()))
        .collect();
    let data = ServerData {
        labelled: train.subset(&labelled),
        unlabelled: train.subset(&unlabelled),
        validation: train.subset(&validation),
    };
    Ok((data, rest))
}

fn split_by_fraction(
    train: &Dataset,
    cfg: &crate::config::ServerDataConfig,
    seed: u64,
) -> (ServerData, Vec<usize>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let n = train.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let take = |f: f64| ((n as f64) * f.clamp(0.0, 1.0)).round() as usize;
    let (l, u, v) = (
        take(cfg.labelled_fraction),
        take(cfg.unlabelled_fraction),
        take(cfg.validation_fraction),
    );
    let l_end = l.min(n);
    let u_end = (l_end + u).min(n);
    let v_end = (u_end + v).min(n);
    let data = ServerData {
        labelled: train.subset(&idx[..l_end]),
        unlabelled: train.subset(&idx[l_end..u_end]),
        validation: train.subset(&idx[u_end..v_end]),
    };
    let mut rest = idx[v_end..].to_vec();
    rest.sort_unstable();
    (data, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerDataConfig;
    use coevo_models::data::synthetic;

    /// 60 samples over writers w0..w5 (10 each, interleaved so rows of a writer are scattered).
    fn with_writers() -> Dataset {
        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 4,
        };
        let mut d = synthetic(60, 4, shape, 3).train;
        d.clients = Some((0..60).map(|i| format!("w{}", i % 6)).collect());
        d
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn roles_by_client_id_take_whole_writers_and_leave_the_rest() {
        let d = with_writers();
        let cfg = ServerDataConfig {
            labelled_clients: ids(&["w0", "w1"]),
            unlabelled_clients: ids(&["w2"]),
            validation_holdout: 0.25,
            ..ServerDataConfig::default()
        };
        let (s, rest) = split_server_data(&d, &cfg, 7).unwrap();
        // Two labelled writers, a quarter held out rounds to one whole writer for validation.
        assert_eq!(s.validation.len(), 10);
        assert_eq!(s.labelled.len(), 10);
        assert_eq!(s.unlabelled.len(), 10);
        let w = d.clients.as_ref().unwrap();
        assert_eq!(rest.len(), 30);
        assert!(rest
            .iter()
            .all(|&i| ["w3", "w4", "w5"].contains(&w[i].as_str())));
        let writers = |set: &Dataset| {
            let mut c = set.clients.clone().unwrap();
            c.sort();
            c.dedup();
            c
        };
        let (lw, vw) = (writers(&s.labelled), writers(&s.validation));
        assert_eq!((lw.len(), vw.len()), (1, 1));
        assert_ne!(lw, vw, "validation writers are never trained on");
        assert!(["w0", "w1"].contains(&lw[0].as_str()) && ["w0", "w1"].contains(&vw[0].as_str()));
        // Explicit validation writers instead of a holdout.
        let cfg = ServerDataConfig {
            validation_clients: ids(&["w5"]),
            ..cfg
        };
        let (s, rest) = split_server_data(&d, &cfg, 7).unwrap();
        assert_eq!((s.labelled.len(), s.validation.len()), (20, 10));
        assert_eq!(rest.len(), 20);
    }

    #[test]
    fn unknown_writer_or_missing_clients_file_is_an_error() {
        let mut d = with_writers();
        let cfg = ServerDataConfig {
            labelled_clients: ids(&["w0", "nobody"]),
            ..ServerDataConfig::default()
        };
        let e = split_server_data(&d, &cfg, 1).err().unwrap();
        assert!(e.to_string().contains("nobody"), "{e}");
        d.clients = None;
        let cfg = ServerDataConfig {
            labelled_clients: ids(&["w0"]),
            ..ServerDataConfig::default()
        };
        let e = split_server_data(&d, &cfg, 1).err().unwrap();
        assert!(e.to_string().contains("clients file"), "{e}");
    }
}
