//! Mixed-precision state of the step: fp16's dynamic loss scale and bf16-pure's bf16 copy of
//! the network.
use anyhow::Result;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::step::{defined_gradients, sorted_variables};
use crate::config::RunConfig;
use crate::model::UNet;
use crate::ops;

/// PyTorch GradScaler's dynamic loss scale, kept on the device.
pub(super) struct LossScaler {
    pub(super) scale: Tensor,
    pub(super) growth_tracker: Tensor,
}

impl LossScaler {
    const INITIAL: f64 = 65536.0;
    const GROWTH_INTERVAL: i64 = 2000;

    pub(super) fn new(device: Device) -> Self {
        LossScaler {
            scale: Tensor::full([1], Self::INITIAL, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
        }
    }

    /// ×2 after GROWTH_INTERVAL clean steps in a row, ×0.5 on a step with inf/NaN gradients.
    pub(super) fn update(&mut self, found_inf: &Tensor) {
        let _ = self.scale.internal_amp_update_scale_(
            &self.growth_tracker,
            found_inf,
            2.0,
            0.5,
            Self::GROWTH_INTERVAL,
        );
    }
}

/// The network in bf16 for `precision = "bf16-pure"`: its weights are copied from the f32
/// master weights once per step, forward and backward run in bf16 without autocast's per-op
/// casts (GroupNorm still gathers its statistics in f32), and its gradients are added into the
/// f32 gradients after each micro-batch.
pub(super) struct Bf16Network {
    _vs: VarStore,
    pub(super) model: UNet,
    pub(super) params: Vec<Tensor>,
    /// The bf16 gradients, once backward has made them.
    grads: Option<Vec<Tensor>>,
    /// f32 copies of them, for micro-batches after the first.
    staged: Option<Vec<Tensor>>,
}

impl Bf16Network {
    pub(super) fn new(config: &RunConfig, device: Device, fused_norm_silu: bool) -> Result<Self> {
        let mut vs = VarStore::new(device);
        let mut model = UNet::new(&vs.root(), &config.model);
        model.set_fused_norm_silu(fused_norm_silu);
        vs.bfloat16();
        let (_, params) = sorted_variables(&vs);
        if config.train.channels_last {
            ops::to_channels_last_(&params)?;
        }
        Ok(Bf16Network {
            _vs: vs,
            model,
            params,
            grads: None,
            staged: None,
        })
    }

    /// Moves this network's gradients into the f32 `sums` (set by the first micro-batch, added
    /// to by the others) and zeroes them. On CUDA a copy across dtypes is one multi-tensor
    /// kernel and an add across dtypes is not, hence the f32 staging copy for later micro-batches.
    pub(super) fn move_gradients_into(
        &mut self,
        sums: &[Tensor],
        first: bool,
        names: &[String],
    ) -> Result<()> {
        if self.grads.is_none() {
            self.grads = Some(defined_gradients(&self.params, names)?);
        }
        let grads = self.grads.as_ref().expect("just set");
        if first {
            ops::foreach_copy_(sums, grads)?;
        } else {
            let staged = self
                .staged
                .get_or_insert_with(|| sums.iter().map(Tensor::zeros_like).collect());
            ops::foreach_copy_(staged, grads)?;
            ops::foreach_add_(sums, staged)?;
        }
        ops::foreach_zero_(grads)
    }
}
