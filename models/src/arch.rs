//! Which network a role (student or teacher) uses: a built-in CNN or a user's TorchScript
//! module (issue #16). The smallest abstraction that lets both stand in everywhere: every place
//! that used to call `Student::new(&vs.root(), &shape)` calls
//! `arch.build(&vs.root(), &shape)?` instead and gets a [`Net`], which is a [`ModuleT`] whose
//! variables live in the same `VarStore`, so training, distillation, [`crate::Weights`] and
//! everything downstream of them need no other change.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::net::{NetKind, Student};
use crate::script::{ScriptModule, ScriptNet};
use crate::{DataShape, ModelError};

/// A role's architecture.
#[derive(Clone, Debug, PartialEq)]
pub enum Arch {
    /// The built-in [`Student`] or [`crate::Teacher`], sized from the data.
    Builtin(NetKind),
    /// A TorchScript module; its input and output must fit the data ([`ScriptModule::check`]).
    Script(ScriptModule),
}

impl From<NetKind> for Arch {
    fn from(kind: NetKind) -> Arch {
        Arch::Builtin(kind)
    }
}

impl From<&Arch> for Arch {
    fn from(a: &Arch) -> Arch {
        a.clone()
    }
}

impl Arch {
    /// The built-in student, the default.
    pub fn student() -> Arch {
        Arch::Builtin(NetKind::Student)
    }

    /// The built-in teacher, the default.
    pub fn teacher() -> Arch {
        Arch::Builtin(NetKind::Teacher)
    }

    /// Builds the network under `p`. Built-in nets initialise from libtorch's generator (seed
    /// it first for reproducible weights); a TorchScript module starts from the weights in its
    /// file.
    pub fn build(&self, p: &nn::Path, shape: &DataShape) -> Result<Net, ModelError> {
        match self {
            Arch::Builtin(NetKind::Student) => Ok(Net::Student(Student::new(p, shape))),
            #[cfg(feature = "teacher")]
            Arch::Builtin(NetKind::Teacher) => Ok(Net::Teacher(crate::Teacher::new(p, shape))),
            #[cfg(not(feature = "teacher"))]
            Arch::Builtin(NetKind::Teacher) => Err(ModelError::Config(
                "this build has no teacher (the `teacher` feature is off)".into(),
            )),
            Arch::Script(m) => Ok(Net::Script(m.load(p)?)),
        }
    }

    /// Checks that the architecture fits `shape` (a no-op for built-in nets, which are sized
    /// from it); for a module, see [`ScriptModule::check`].
    pub fn check(&self, shape: &DataShape) -> Result<(), ModelError> {
        match self {
            Arch::Builtin(_) => Ok(()),
            Arch::Script(m) => m.check(shape).map(|_| ()),
        }
    }

    /// The TorchScript module, if this is one.
    pub fn module(&self) -> Option<&ScriptModule> {
        match self {
            Arch::Builtin(_) => None,
            Arch::Script(m) => Some(m),
        }
    }

    /// Short human-readable name for logs and reports: `student-cnn`, `teacher-cnn` or
    /// `torchscript:<digest prefix>`.
    pub fn label(&self) -> String {
        match self {
            Arch::Builtin(NetKind::Student) => "student-cnn".into(),
            Arch::Builtin(NetKind::Teacher) => "teacher-cnn".into(),
            Arch::Script(m) => format!("torchscript:{}", m.digest().short()),
        }
    }
}

/// A built network: one of the built-in CNNs or a loaded TorchScript module.
#[derive(Debug)]
pub enum Net {
    Student(Student),
    #[cfg(feature = "teacher")]
    Teacher(crate::Teacher),
    Script(ScriptNet),
}

impl ModuleT for Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Net::Student(n) => n.forward_t(xs, train),
            #[cfg(feature = "teacher")]
            Net::Teacher(n) => n.forward_t(xs, train),
            Net::Script(n) => n.forward_t(xs, train),
        }
    }
}

/// Scalars in the state dict of `arch` built for `shape` (what travels per model).
pub fn param_count(arch: &Arch, shape: &DataShape) -> Result<usize, ModelError> {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let _net = arch.build(&vs.root(), shape)?;
    Ok(crate::net::param_count(&vs))
}
