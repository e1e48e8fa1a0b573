//! The optimizer's state (AdamW moments, the EMA of the weights, the steps skipped for
//! non-finite gradients) and the update that reads the gradients: clipping, fused AdamW, EMA.
//! Everything stays on the device; a step with non-finite gradients changes nothing there.
use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::ema_decay;
use super::precision::sorted_variables;
use crate::checkpoint::Checkpoint;
use crate::config::TrainConfig;
use crate::ops::{self, AdamWStep};

pub(super) struct Optimizer {
    /// Parameter names, in the order of every list below (across stores and runs).
    pub(super) names: Vec<String>,
    /// The trained (f32 master) weights and their EMA.
    pub(super) params: Vec<Tensor>,
    pub(super) ema_params: Vec<Tensor>,
    exp_avgs: Vec<Tensor>,
    exp_avg_sqs: Vec<Tensor>,
    pub(super) adam_steps: Vec<Tensor>,
    /// Steps skipped for non-finite gradients, in all and in a row, counted on the device.
    skipped: Tensor,
    consecutive_skipped: Tensor,
}

impl Optimizer {
    /// The state for the weights of `vs` and their EMA in `ema_vs`, zero moments.
    pub(super) fn new(vs: &VarStore, ema_vs: &VarStore, channels_last: bool) -> Result<Self> {
        let (names, params) = sorted_variables(vs);
        let (_, ema_params) = sorted_variables(ema_vs);
        if channels_last {
            // Before the moments are made: zeros_like keeps the layout.
            ops::to_channels_last_(&params)?;
            ops::to_channels_last_(&ema_params)?;
        }
        let device = vs.device();
        let zeros = |p: &Tensor| p.zeros_like();
        Ok(Optimizer {
            names,
            exp_avgs: params.iter().map(zeros).collect(),
            exp_avg_sqs: params.iter().map(zeros).collect(),
            adam_steps: params
                .iter()
                .map(|_| Tensor::zeros([], (Kind::Float, device)))
                .collect(),
            params,
            ema_params,
            skipped: Tensor::zeros([], (Kind::Int64, device)),
            consecutive_skipped: Tensor::zeros([], (Kind::Int64, device)),
        })
    }

    /// Optimizer step `step` (0-based) at learning rate `lr` with the f32 `gradients`: the
    /// global norm (returned, before clipping), clipping, AdamW, EMA and the skip counts. A step
    /// whose gradients are not finite (norm or `found_inf`, set by unscaling) is skipped on the
    /// device; `found_inf` is updated to say so.
    pub(super) fn update(
        &mut self,
        gradients: &[Tensor],
        found_inf: &mut Tensor,
        tc: &TrainConfig,
        step: u64,
        lr: f64,
    ) -> Result<Tensor> {
        let grad_norm = ops::global_norm(gradients)?;
        *found_inf = found_inf.maximum(
            &grad_norm
                .isfinite()
                .logical_not()
                .to_kind(Kind::Float)
                .view([1]),
        );
        if tc.grad_clip > 0.0 {
            let factor = (tc.grad_clip / (&grad_norm + 1e-6)).clamp_max(1.0);
            ops::foreach_mul_(gradients, &factor)?;
        }
        let hp = AdamWStep {
            lr,
            beta1: tc.adam_beta1,
            beta2: tc.adam_beta2,
            weight_decay: tc.weight_decay,
            eps: tc.adam_eps,
        };
        tch::no_grad(|| {
            ops::fused_adamw(
                &self.params,
                gradients,
                &self.exp_avgs,
                &self.exp_avg_sqs,
                &self.adam_steps,
                hp,
                found_inf,
            )
        })?;
        if (step + 1).is_multiple_of(tc.ema_every) {
            let decay = ema_decay(tc, step / tc.ema_every);
            tch::no_grad(|| ops::foreach_lerp_(&self.ema_params, &self.params, 1.0 - decay))?;
        }
        let bad = found_inf.to_kind(Kind::Int64).sum(Kind::Int64);
        self.skipped += &bad;
        self.consecutive_skipped = (&self.consecutive_skipped + &bad) * &bad;
        Ok(grad_norm)
    }

    pub(super) fn skipped_steps(&self) -> u64 {
        self.skipped.int64_value(&[]) as u64
    }

    /// Steps skipped in a row, up to now.
    pub(super) fn consecutive_skipped_steps(&self) -> u64 {
        self.consecutive_skipped.int64_value(&[]) as u64
    }

    /// Whether every weight, raw and EMA, is finite (one read from the device).
    pub(super) fn weights_are_finite(&self) -> bool {
        let non_finite = self
            .params
            .iter()
            .chain(&self.ema_params)
            .map(|p| p.isfinite().logical_not().sum(Kind::Int64))
            .reduce(|a, b| a + b);
        non_finite.is_none_or(|n| n.int64_value(&[]) == 0)
    }

    /// Every tensor of the state, named for the checkpoint.
    pub(super) fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, name) in self.names.iter().enumerate() {
            out.push((format!("model.{name}"), self.params[i].shallow_clone()));
            out.push((format!("ema.{name}"), self.ema_params[i].shallow_clone()));
            out.push((
                format!("adam.exp_avg.{name}"),
                self.exp_avgs[i].shallow_clone(),
            ));
            out.push((
                format!("adam.exp_avg_sq.{name}"),
                self.exp_avg_sqs[i].shallow_clone(),
            ));
        }
        out.push(("adam.step".into(), self.adam_steps[0].shallow_clone()));
        out.push(("skipped_steps".into(), self.skipped.shallow_clone()));
        out.push((
            "consecutive_skipped_steps".into(),
            self.consecutive_skipped.shallow_clone(),
        ));
        out
    }

    /// Restores the state saved by `state_tensors`.
    pub(super) fn load_state(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (i, name) in self.names.iter().enumerate() {
                copy_from(checkpoint, &format!("model.{name}"), &mut self.params[i])?;
                copy_from(checkpoint, &format!("ema.{name}"), &mut self.ema_params[i])?;
                copy_from(
                    checkpoint,
                    &format!("adam.exp_avg.{name}"),
                    &mut self.exp_avgs[i],
                )?;
                copy_from(
                    checkpoint,
                    &format!("adam.exp_avg_sq.{name}"),
                    &mut self.exp_avg_sqs[i],
                )?;
            }
            let step = checkpoint.tensor("adam.step")?;
            for s in &mut self.adam_steps {
                s.copy_(step);
            }
            self.skipped.copy_(checkpoint.tensor("skipped_steps")?);
            self.consecutive_skipped
                .copy_(checkpoint.tensor("consecutive_skipped_steps")?);
            Ok(())
        })
    }

    /// The tensors rank 0 sends to the others so that every rank starts alike.
    pub(super) fn shared_tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.params
            .iter()
            .chain(&self.ema_params)
            .chain(&self.exp_avgs)
            .chain(&self.exp_avg_sqs)
            .chain(&self.adam_steps)
            .chain([&self.skipped, &self.consecutive_skipped])
    }
}

/// Copies the checkpoint's tensor `key` into `dst`, checking its shape.
pub(crate) fn copy_from(checkpoint: &Checkpoint, key: &str, dst: &mut Tensor) -> Result<()> {
    let src = checkpoint.tensor(key)?;
    if dst.size() != src.size() {
        bail!(
            "{}: tensor {key} has shape {:?}, where the network its configuration describes has {:?} (a damaged or edited checkpoint)",
            checkpoint.path.display(),
            src.size(),
            dst.size()
        );
    }
    dst.copy_(src);
    Ok(())
}
