//! The teacher side of co-evolution (DESIGN §5.1 and §5.6): the data centre's teacher distils
//! into the student before each round, and learns back from the merged and client students
//! after it, each step guarded by validation accuracy.
//!
//! All of it is blocking libtorch work; the round loop runs it on a blocking thread.

use crate::CoordinatorError;
use coevo_models::distill::{
    distill, ensemble_logits, fuse, guard_update, logits, GuardOutcome, KdConfig, Soft,
};
use coevo_models::train::{evaluate, train, Evaluation, TrainConfig};
use coevo_models::{DataShape, Dataset, Student, Teacher, Weights};
use serde::{Deserialize, Serialize};

/// Which loop the coordinator runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Student-only federated averaging: the classic baseline.
    #[default]
    Fedavg,
    /// Teacher ⇄ student co-evolution: distil before each round, fuse after it.
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
    /// Upward ensemble distillation, students → teacher.
    pub fuse: KdConfig,
    /// Largest validation drop accepted from fusion before it is rolled back.
    pub fuse_epsilon: f64,
}

impl Default for CoevolutionConfig {
    fn default() -> Self {
        CoevolutionConfig {
            pretrain_epochs: 40,
            pretrain_lr: 0.02,
            distill: KdConfig::default(),
            distill_epsilon: 0.0,
            fuse: KdConfig {
                epochs: 1,
                ..KdConfig::default()
            },
            fuse_epsilon: 0.02,
        }
    }
}

/// What the teacher loop did in a round, for the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoevolutionReport {
    pub distillation: Option<GuardOutcome>,
    pub fusion: Option<GuardOutcome>,
}

/// The teacher, a scratch student for distillation, and the server data.
pub struct TeacherLoop {
    shape: DataShape,
    teacher_vs: tch::nn::VarStore,
    teacher: Teacher,
    student_vs: tch::nn::VarStore,
    student: Student,
    data: ServerData,
    /// Labelled and unlabelled images together: the distillation transfer set.
    transfer: tch::Tensor,
    cfg: CoevolutionConfig,
}

impl TeacherLoop {
    pub fn new(
        shape: DataShape,
        data: ServerData,
        cfg: CoevolutionConfig,
    ) -> Result<Self, CoordinatorError> {
        if data.labelled.is_empty() || data.validation.is_empty() {
            return Err(CoordinatorError::Config(
                "coevolve mode needs a non-empty labelled and validation set".into(),
            ));
        }
        let teacher_vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let teacher = Teacher::new(&teacher_vs.root(), &shape);
        let student_vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let student = Student::new(&student_vs.root(), &shape);
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
            data,
            transfer,
            cfg,
        })
    }

    /// Trains the teacher on the labelled set: where it starts (the lower bound).
    pub fn pretrain(&mut self, seed: u64) -> Result<Evaluation, CoordinatorError> {
        let cfg = TrainConfig {
            epochs: self.cfg.pretrain_epochs,
            batch_size: 32,
            lr: self.cfg.pretrain_lr,
            momentum: 0.9,
            prox_mu: 0.0,
            seed,
        };
        train(&self.teacher, &self.teacher_vs, &self.data.labelled, &cfg)?;
        Ok(evaluate(&self.teacher, &self.data.validation, 512))
    }

    pub fn teacher_weights(&self) -> Weights {
        Weights::from_var_store(&self.teacher_vs)
    }

    pub fn load_teacher(&mut self, w: &Weights) -> Result<(), CoordinatorError> {
        Ok(w.load_into(&mut self.teacher_vs)?)
    }

    /// Student ← KD(teacher), warm-started from `global`; returns the student to publish
    /// (`global` itself if the guard rolled distillation back).
    pub fn distill_into(
        &mut self,
        global: &Weights,
    ) -> Result<(Weights, GuardOutcome), CoordinatorError> {
        global.load_into(&mut self.student_vs)?;
        let teacher_logits = logits(&self.teacher, &self.transfer, 256)?;
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
        Ok((Weights::from_var_store(&self.student_vs), outcome))
    }

    /// Teacher learns from the ensemble of `members` (merged student and client students) on
    /// the unlabelled pool, plus cross-entropy on the labelled set; rolled back past ε.
    pub fn fuse_from(&mut self, members: &[&Weights]) -> Result<GuardOutcome, CoordinatorError> {
        let pool = if self.data.unlabelled.is_empty() {
            &self.data.labelled.images
        } else {
            &self.data.unlabelled.images
        };
        let soft = ensemble_logits(&self.shape, members, pool, 256)?;
        let (outcome, _) = guard_update(
            &self.teacher,
            &mut self.teacher_vs,
            &self.data.validation,
            self.cfg.fuse_epsilon,
            None,
            |vs| {
                fuse(
                    &self.teacher,
                    vs,
                    pool,
                    Soft::Logits(&soft),
                    Some(&self.data.labelled),
                    &self.cfg.fuse,
                )
            },
        )?;
        Ok(outcome)
    }

    pub fn evaluate_teacher(&self, test: &Dataset) -> Evaluation {
        evaluate(&self.teacher, test, 512)
    }
}

/// Splits a training set into the server's roles by the fractions of `cfg` after a seeded
/// shuffle; returns them and the indices left for the clients.
pub fn split_server_data(
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
