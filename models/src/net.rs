//! The networks: a small student CNN cheap enough to train on an edge CPU, and a large teacher
//! CNN for the data centre, both sized from the dataset's [`DataShape`].
//!
//! Layers are registered through `p / "name"` so the state-dict keys (`conv1.weight`, …) are
//! stable: they are the names that travel inside [`crate::Weights`] and must match on every
//! client and on the coordinator.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::DataShape;

/// conv(C→16, 5×5, pad 2) → relu → maxpool 2 → conv(16→32, 5×5, pad 2) → relu → maxpool 2 →
/// flatten → linear(32·⌊H/4⌋·⌊W/4⌋ → 64) → relu → linear(64 → classes).
///
/// About 114k parameters for 28×28 grey, 10 classes. Inputs must be at least 4×4 so the two
/// poolings leave at least one pixel.
#[derive(Debug)]
pub struct Student {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Student {
    /// Registers the layers under `p`; variable names are `conv1.*`, `conv2.*`, `fc1.*`, `fc2.*`.
    pub fn new(p: &nn::Path, shape: &DataShape) -> Student {
        let c = shape.channels.max(1) as i64;
        let flat = 32 * (shape.height / 4).max(1) as i64 * (shape.width / 4).max(1) as i64;
        Student {
            conv1: nn::conv2d(p / "conv1", c, 16, 5, conv_cfg(c * 25)),
            conv2: nn::conv2d(p / "conv2", 16, 32, 5, conv_cfg(16 * 25)),
            fc1: nn::linear(p / "fc1", flat, 64, linear_cfg(flat)),
            fc2: nn::linear(p / "fc2", 64, shape.classes.max(1) as i64, linear_cfg(64)),
        }
    }
}

/// PyTorch's default init, U(±1/√fan_in) for weights and biases. tch's default (Kaiming with
/// ReLU gain, ≈2.4× wider) makes the initial logits large, and with SGD + momentum 0.9 at lr 0.05
/// the first epoch then spends most of its steps recovering.
fn torch_default_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

fn conv_cfg(fan_in: i64) -> nn::ConvConfig {
    nn::ConvConfig {
        padding: 2,
        ws_init: torch_default_init(fan_in),
        bs_init: torch_default_init(fan_in),
        ..Default::default()
    }
}

fn linear_cfg(fan_in: i64) -> nn::LinearConfig {
    nn::LinearConfig {
        ws_init: torch_default_init(fan_in),
        bs_init: Some(torch_default_init(fan_in)),
        bias: true,
    }
}

impl ModuleT for Student {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        xs.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
    }
}

/// Which of the two architectures (for [`flops_per_image`] and reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetKind {
    /// [`Student`]: runs and fine-tunes on the edge.
    Student,
    /// [`Teacher`]: lives in the data centre.
    Teacher,
}

#[cfg(feature = "teacher")]
/// Dropout after the teacher's hidden layer: the teacher often starts from a small labelled set
/// (e.g. 10 writers) where a 3M-parameter net overfits quickly without it.
const TEACHER_DROPOUT: f64 = 0.3;

/// The data-centre teacher: conv(C→32, 5×5, pad 2) → relu → maxpool 2 → conv(32→64, 5×5, pad 2)
/// → relu → conv(64→160, 3×3, pad 1) → relu → maxpool 2 → flatten →
/// linear(160·⌊H/4⌋·⌊W/4⌋ → 384) → relu → dropout 0.3 → linear(384 → classes).
///
/// Sized against [`Student`]: about 27× its parameters and ≥ 9× its multiply-adds per image for
/// both 28×28 grey (10.9×) and 32×32 RGB (9.3×) inputs, the bound the co-evolution setting asks
/// for (the student must be at most 1/20 of the teacher and 9× cheaper). The extra width sits in
/// the second-resolution convolutions, where it buys accuracy; no batch-norm, so the state dict
/// is exactly the trainable parameters and [`crate::Weights`] round-trips it without running
/// statistics. Inputs must be at least 4×4.
#[cfg(feature = "teacher")]
#[derive(Debug)]
pub struct Teacher {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    conv3: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

#[cfg(feature = "teacher")]
impl Teacher {
    /// Registers the layers under `p`; variable names are `conv1.*`, `conv2.*`, `conv3.*`,
    /// `fc1.*`, `fc2.*`.
    pub fn new(p: &nn::Path, shape: &DataShape) -> Teacher {
        let c = shape.channels.max(1) as i64;
        let flat = 160 * (shape.height / 4).max(1) as i64 * (shape.width / 4).max(1) as i64;
        let conv3 = nn::ConvConfig {
            padding: 1,
            ..conv_cfg(64 * 9)
        };
        Teacher {
            conv1: nn::conv2d(p / "conv1", c, 32, 5, conv_cfg(c * 25)),
            conv2: nn::conv2d(p / "conv2", 32, 64, 5, conv_cfg(32 * 25)),
            conv3: nn::conv2d(p / "conv3", 64, 160, 3, conv3),
            fc1: nn::linear(p / "fc1", flat, 384, linear_cfg(flat)),
            fc2: nn::linear(p / "fc2", 384, shape.classes.max(1) as i64, linear_cfg(384)),
        }
    }
}

#[cfg(feature = "teacher")]
impl ModuleT for Teacher {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .apply(&self.conv3)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .dropout(TEACHER_DROPOUT, train)
            .apply(&self.fc2)
    }
}

/// Multiply-accumulates of one forward pass of one image through `kind` built for `shape`.
///
/// Convention: one multiply-add = one FLOP (the usual "FLOPs" of model zoos, i.e. MACs); only
/// convolution and linear layers are counted (biases, activations, pooling and dropout are
/// cheap element-wise work and ignored). A conv layer costs `out_h · out_w · out_ch · in_ch · k²`,
/// a linear layer `in · out`. Matches the layers built by [`Student::new`] / [`Teacher::new`],
/// including their clamping of 0 channels/classes and sub-4-pixel sides to 1.
pub fn flops_per_image(kind: NetKind, shape: &DataShape) -> u64 {
    let c = shape.channels.max(1) as u64;
    let classes = shape.classes.max(1) as u64;
    let (h, w) = (shape.height as u64, shape.width as u64);
    let (h2, w2) = (h / 2, w / 2);
    let (h4, w4) = ((h / 4).max(1), (w / 4).max(1));
    let conv = |oh: u64, ow: u64, cin: u64, cout: u64, k: u64| oh * ow * cout * cin * k * k;
    match kind {
        NetKind::Student => {
            let flat = 32 * h4 * w4;
            conv(h, w, c, 16, 5) + conv(h2, w2, 16, 32, 5) + flat * 64 + 64 * classes
        }
        NetKind::Teacher => {
            let flat = 160 * h4 * w4;
            conv(h, w, c, 32, 5)
                + conv(h2, w2, 32, 64, 5)
                + conv(h2, w2, 64, 160, 3)
                + flat * 384
                + 384 * classes
        }
    }
}

/// Total number of scalars in the var store (trainable or not).
pub fn param_count(vs: &nn::VarStore) -> usize {
    vs.variables().values().map(Tensor::numel).sum()
}

// The tests compare the student with the teacher, so they need it.
#[cfg(all(test, feature = "teacher"))]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn shapes_and_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let shape = DataShape {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        };
        let net = Student::new(&vs.root(), &shape);
        assert_eq!(param_count(&vs), 416 + 12_832 + 100_416 + 650);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "conv1.bias",
                "conv1.weight",
                "conv2.bias",
                "conv2.weight",
                "fc1.bias",
                "fc1.weight",
                "fc2.bias",
                "fc2.weight"
            ]
        );
        let out = net.forward_t(
            &Tensor::zeros([3, 1, 28, 28], (Kind::Float, Device::Cpu)),
            false,
        );
        assert_eq!(out.size(), vec![3, 10]);

        let vs = nn::VarStore::new(Device::Cpu);
        let rgb = DataShape {
            channels: 3,
            height: 32,
            width: 32,
            classes: 62,
        };
        let net = Student::new(&vs.root(), &rgb);
        let out = net.forward_t(
            &Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)),
            true,
        );
        assert_eq!(out.size(), vec![2, 62]);
    }

    fn build(kind: NetKind, shape: &DataShape) -> (nn::VarStore, Box<dyn ModuleT>) {
        let vs = nn::VarStore::new(Device::Cpu);
        let net: Box<dyn ModuleT> = match kind {
            NetKind::Student => Box::new(Student::new(&vs.root(), shape)),
            NetKind::Teacher => Box::new(Teacher::new(&vs.root(), shape)),
        };
        (vs, net)
    }

    #[test]
    fn teacher_is_20x_bigger_and_9x_costlier() {
        let shapes = [
            (1, 28, 28, 10),
            (1, 28, 28, 62),
            (3, 32, 32, 10),
            (3, 32, 32, 100),
        ];
        for (channels, height, width, classes) in shapes {
            let shape = DataShape {
                channels,
                height,
                width,
                classes,
            };
            let (svs, snet) = build(NetKind::Student, &shape);
            let (tvs, tnet) = build(NetKind::Teacher, &shape);
            let ratio = param_count(&tvs) as f64 / param_count(&svs) as f64;
            assert!(ratio >= 20.0, "{shape:?}: param ratio {ratio}");
            let flops = flops_per_image(NetKind::Teacher, &shape) as f64
                / flops_per_image(NetKind::Student, &shape) as f64;
            assert!(flops >= 9.0, "{shape:?}: flop ratio {flops}");
            let x = Tensor::zeros(
                [2, channels as i64, height as i64, width as i64],
                (Kind::Float, Device::Cpu),
            );
            assert_eq!(tnet.forward_t(&x, true).size(), vec![2, classes as i64]);
            assert_eq!(snet.forward_t(&x, false).size(), vec![2, classes as i64]);
        }
        // Hand count for the student at 28×28 grey, 10 classes (documents the convention).
        let mnist = DataShape {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        };
        assert_eq!(
            flops_per_image(NetKind::Student, &mnist),
            28 * 28 * 16 * 25 + 14 * 14 * 32 * 16 * 25 + 1568 * 64 + 640
        );
    }

    #[test]
    fn teacher_dropout_only_in_training() {
        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 4,
        };
        let (_vs, net) = build(NetKind::Teacher, &shape);
        let x = Tensor::ones([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let a = net.forward_t(&x, false);
        let b = net.forward_t(&x, false);
        assert!(a.equal(&b));
    }
}
