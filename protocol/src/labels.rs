//! What an edge did with its labels in a round (issue #18), signed in its delta header.

use serde::{Deserialize, Serialize};

/// Label counts of one camera's round: how many frames had a label, how many unlabelled
/// frames the round's model pseudo-labelled, and how many labels it cleaned. The coordinator
/// weighs the camera's update by `estimated_noise` and leaves it out of fusion above
/// `[coevolution] max_client_noise`; the round report lists it per client.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelCounts {
    /// Frames with a label (right or wrong: the edge cannot tell).
    pub labelled: u64,
    /// Frames without one.
    pub unlabelled: u64,
    /// Unlabelled frames trained on with the model's label: confident and stable under a
    /// strong augmentation.
    pub pseudo_labelled: u64,
    /// Labelled frames whose label the model confidently and stably contradicted, trained on
    /// with the model's label instead.
    pub relabelled: u64,
    /// Labelled frames left out of training (the largest losses: small-loss selection).
    pub discarded: u64,
    /// Fraction of labelled frames whose label the received model predicts (`None`: no
    /// labelled frame, or no selection pass was run).
    pub agreement: Option<f64>,
    /// Estimated fraction of wrong labels: among labelled frames the received model predicts
    /// confidently, the share whose label disagrees (`None`: too few such frames for an
    /// estimate).
    pub estimated_noise: Option<f64>,
    /// Labelled frames the estimate is based on (the confidently predicted ones): how much
    /// evidence it has, so the coordinator can bound it.
    pub judged: u64,
}
