//! The student network: a small CNN sized from the dataset, cheap enough to train on an edge CPU.
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

/// Total number of scalars in the var store (trainable or not).
pub fn param_count(vs: &nn::VarStore) -> usize {
    vs.variables().values().map(Tensor::numel).sum()
}

#[cfg(test)]
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
}
