//! Mixed-precision state of the step: fp16's dynamic loss scale and bf16-pure's bf16 copy of
//! the network.
use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::{Precision, RunConfig};
use crate::model::UNet;
use crate::ops::{self, AutocastType};

/// Variables of a store in name order, so that every list lines up across stores and runs.
pub(super) fn sorted_variables(vs: &VarStore) -> (Vec<String>, Vec<Tensor>) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter().unzip()
}

/// The .grad of every parameter, or an error naming one that received none.
fn defined_gradients(params: &[Tensor], names: &[String]) -> Result<Vec<Tensor>> {
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
    if let Some(i) = grads.iter().position(|g| !g.defined()) {
        bail!("parameter {} received no gradient", names[i]);
    }
    Ok(grads)
}

/// PyTorch GradScaler's dynamic loss scale, kept on the device.
struct LossScaler {
    scale: Tensor,
    growth_tracker: Tensor,
}

impl LossScaler {
    const INITIAL: f64 = 65536.0;
    const GROWTH_INTERVAL: i64 = 2000;

    fn new(device: Device) -> Self {
        LossScaler {
            scale: Tensor::full([1], Self::INITIAL, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
        }
    }

    /// ×2 after GROWTH_INTERVAL clean steps in a row, ×0.5 on a step with inf/NaN gradients.
    fn update(&mut self, found_inf: &Tensor) {
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
struct Bf16Network {
    _vs: VarStore,
    model: UNet,
    params: Vec<Tensor>,
    /// The bf16 gradients, once backward has made them.
    grads: Option<Vec<Tensor>>,
    /// f32 copies of them, for micro-batches after the first.
    staged: Option<Vec<Tensor>>,
}

impl Bf16Network {
    fn new(config: &RunConfig, device: Device, fused_norm_silu: bool) -> Result<Self> {
        let mut vs = VarStore::new(device);
        let mut model = UNet::new(&vs.root(), &config.model);
        model.set_fused_norm_silu(fused_norm_silu);
        model.set_activation_checkpointing(config.train.activation_checkpointing);
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
    fn move_gradients_into(
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

/// How the step computes under `train.precision`, and where its f32 gradients are: one type,
/// with one meaning of its gradients whatever the precision.
pub(super) struct PrecisionStrategy {
    autocast: Option<AutocastType>,
    /// fp16's dynamic loss scale.
    scaler: Option<LossScaler>,
    /// bf16-pure's bf16 copy of the network, which computes the gradients.
    bf16: Option<Bf16Network>,
    /// The f32 gradients the update reads, once known: the parameters' .grad, which autograd
    /// makes on the first backward, or (bf16-pure) sums of the bf16 network's gradients.
    gradients: Option<Vec<Tensor>>,
}

impl PrecisionStrategy {
    pub(super) fn new(
        config: &RunConfig,
        device: Device,
        fused_norm_silu: bool,
        params: &[Tensor],
    ) -> Result<Self> {
        let precision = config.train.precision;
        let bf16 = match precision {
            Precision::Bf16Pure => Some(Bf16Network::new(config, device, fused_norm_silu)?),
            _ => None,
        };
        Ok(PrecisionStrategy {
            autocast: match precision {
                Precision::Bf16 => Some(AutocastType::Bf16),
                Precision::Fp16 => Some(AutocastType::Fp16),
                Precision::F32 | Precision::Tf32 | Precision::Bf16Pure => None,
            },
            scaler: (precision == Precision::Fp16).then(|| LossScaler::new(device)),
            gradients: bf16
                .is_some()
                .then(|| params.iter().map(Tensor::zeros_like).collect()),
            bf16,
        })
    }

    /// Whether the gradients are sums made outside autograd (bf16-pure): data-parallel ranks
    /// then average them after backward, not in a reducer during it.
    pub(super) fn sums_outside_autograd(&self) -> bool {
        self.bf16.is_some()
    }

    /// Before the first micro-batch of a step: backward adds into autograd's gradients, so they
    /// are zeroed; bf16-pure's network takes the f32 weights.
    pub(super) fn begin_step(&self, params: &[Tensor]) -> Result<()> {
        match (&self.bf16, &self.gradients) {
            (Some(net), _) => tch::no_grad(|| ops::foreach_copy_(&net.params, params)),
            (None, Some(gradients)) => ops::foreach_zero_(gradients),
            (None, None) => Ok(()),
        }
    }

    /// The prediction of `model` (the f32 network) for x_t at t (and classes), in f32.
    pub(super) fn forward(
        &self,
        model: &UNet,
        x_t: &Tensor,
        t: &Tensor,
        classes: Option<&Tensor>,
    ) -> Result<Tensor> {
        let forward = || model.forward(x_t, t, classes, true);
        Ok(match (&self.bf16, self.autocast) {
            (Some(net), _) => net
                .model
                .forward(&x_t.to_kind(Kind::BFloat16), t, classes, true)
                .to_kind(Kind::Float),
            (None, Some(dtype)) => ops::autocast(x_t.device(), dtype, forward)?,
            (None, None) => forward(),
        })
    }

    /// Backward of `loss` (scaled by fp16's loss scale).
    pub(super) fn backward(&self, loss: &Tensor) -> Result<(), tch::TchError> {
        match &self.scaler {
            Some(s) => (loss * &s.scale.squeeze()).f_backward(),
            None => loss.f_backward(),
        }
    }

    /// After micro-batch backward (`first` of the step or not): bf16-pure's gradients go into
    /// the f32 sums.
    pub(super) fn after_backward(&mut self, first: bool, names: &[String]) -> Result<()> {
        if let (Some(net), Some(sums)) = (&mut self.bf16, &self.gradients) {
            net.move_gradients_into(sums, first, names)?;
        }
        Ok(())
    }

    /// bf16-pure's f32 sums, which data-parallel ranks average after backward.
    pub(super) fn sums(&self) -> Option<&[Tensor]> {
        self.gradients.as_deref().filter(|_| self.bf16.is_some())
    }

    /// After the first backward, autograd's gradients exist: they are taken from here on (an
    /// error names a parameter that received none).
    pub(super) fn take_up_gradients(&mut self, params: &[Tensor], names: &[String]) -> Result<()> {
        if self.gradients.is_none() {
            self.gradients = Some(defined_gradients(params, names)?);
        }
        Ok(())
    }

    /// The f32 gradients the update reads, unscaled (fp16), and `found_inf` (1 where the
    /// unscaled gradients are not finite, else 0).
    pub(super) fn unscaled_gradients(&self, device: Device) -> Result<(&[Tensor], Tensor)> {
        let Some(gradients) = self.gradients.as_deref() else {
            bail!("the update comes after the gradients are computed");
        };
        let found_inf = Tensor::zeros([1], (Kind::Float, device));
        if let Some(s) = &self.scaler {
            ops::amp_unscale_(gradients, &found_inf, &s.scale.reciprocal())?;
        }
        Ok((gradients, found_inf))
    }

    /// fp16: the loss scale after a step (`found_inf` says whether it was skipped).
    pub(super) fn update_scale(&mut self, found_inf: &Tensor) {
        if let Some(s) = &mut self.scaler {
            s.update(found_inf);
        }
    }

    /// bf16-pure's bf16 weights, for the tests.
    #[cfg(test)]
    pub(super) fn bf16_params(&self) -> Option<&[Tensor]> {
        self.bf16.as_ref().map(|net| net.params.as_slice())
    }

    pub(super) fn loss_scale(&self) -> Option<f64> {
        self.scaler.as_ref().map(|s| s.scale.double_value(&[0]))
    }

    /// fp16's scaler state, named for the checkpoint.
    pub(super) fn state_tensors(&self) -> Vec<(String, Tensor)> {
        match &self.scaler {
            Some(s) => vec![
                ("scaler.scale".into(), s.scale.shallow_clone()),
                (
                    "scaler.growth_tracker".into(),
                    s.growth_tracker.shallow_clone(),
                ),
            ],
            None => vec![],
        }
    }

    /// Restores the scaler state, where the checkpoint has one (a run may change precision).
    pub(super) fn load_state(&mut self, checkpoint: &crate::checkpoint::Checkpoint) {
        if let Some(s) = &mut self.scaler {
            if let (Ok(scale), Ok(tracker)) = (
                checkpoint.tensor("scaler.scale"),
                checkpoint.tensor("scaler.growth_tracker"),
            ) {
                tch::no_grad(|| {
                    s.scale.copy_(scale);
                    s.growth_tracker.copy_(tracker);
                });
            }
        }
    }

    /// The state rank 0 sends to the others.
    pub(super) fn shared_tensors(&self) -> Vec<Tensor> {
        self.scaler
            .iter()
            .flat_map(|s| [s.scale.shallow_clone(), s.growth_tracker.shallow_clone()])
            .collect()
    }
}
