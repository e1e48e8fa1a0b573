//! Safe wrappers over the project's C++ binding (`csrc/ops.cpp`): dtype-aware autocast and the
//! multi-tensor kernels that keep the optimizer, clipping and EMA free of per-tensor host work.
use std::ffi::{c_char, c_int, CStr};

use anyhow::{anyhow, Result};
use tch::{Device, Tensor};

/// An `at::Tensor*`, opaque on this side.
type CTensor = *mut std::ffi::c_void;

extern "C" {
    fn ddpm_free_error(message: *mut c_char);
    fn ddpm_torch_version() -> *const c_char;
    fn ddpm_set_tf32(allowed: c_int) -> *mut c_char;
    fn ddpm_autocast_enter(cuda: c_int, dtype: c_int) -> *mut c_char;
    fn ddpm_autocast_exit(cuda: c_int) -> *mut c_char;
    fn ddpm_fused_adamw(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        steps: *const CTensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: CTensor,
    ) -> *mut c_char;
    fn ddpm_global_norm(tensors: *const CTensor, n: usize, out: *mut CTensor) -> *mut c_char;
    fn ddpm_foreach_mul_(tensors: *const CTensor, n: usize, factor: CTensor) -> *mut c_char;
    fn ddpm_foreach_lerp_(targets: *const CTensor, sources: *const CTensor, n: usize, weight: f64) -> *mut c_char;
    fn ddpm_foreach_zero_(tensors: *const CTensor, n: usize) -> *mut c_char;
    fn ddpm_amp_unscale_(grads: *const CTensor, n: usize, found_inf: CTensor, inv_scale: CTensor) -> *mut c_char;
}

fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string allocated by the binding.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { ddpm_free_error(message) };
    Err(anyhow!("libtorch: {text}"))
}

fn ptrs(tensors: &[Tensor]) -> Vec<CTensor> {
    tensors.iter().map(|t| t.as_ptr() as CTensor).collect()
}

fn ptr(tensor: &Tensor) -> CTensor {
    tensor.as_ptr() as CTensor
}

/// The libtorch version this program runs on, e.g. "2.11.0".
pub fn torch_version() -> String {
    // SAFETY: a static NUL-terminated string in the binding.
    unsafe { CStr::from_ptr(ddpm_torch_version()) }.to_string_lossy().into_owned()
}

/// Allows or forbids TF32 tensor-core math for f32 matmuls and convolutions.
pub fn set_tf32(allowed: bool) -> Result<()> {
    check(unsafe { ddpm_set_tf32(c_int::from(allowed)) })
}

/// The reduced-precision type of an autocast region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutocastType {
    Bf16 = 1,
    Fp16 = 2,
}

/// Runs `f` with libtorch's autocast on for `device`'s type, casting eligible ops to `dtype`.
pub fn autocast<T>(device: Device, dtype: AutocastType, f: impl FnOnce() -> T) -> Result<T> {
    let cuda = c_int::from(device.is_cuda());
    check(unsafe { ddpm_autocast_enter(cuda, dtype as c_int) })?;
    struct Exit(c_int);
    impl Drop for Exit {
        fn drop(&mut self) {
            // Leaving can only fail if entering did, which returned early above.
            let _ = check(unsafe { ddpm_autocast_exit(self.0) });
        }
    }
    let _exit = Exit(cuda);
    Ok(f())
}

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One fused AdamW update of `params`; `steps` (one f32 scalar per parameter) count updates.
/// Where `found_inf` is non-zero the update, and the step count, are skipped on the device.
pub fn fused_adamw(params: &[Tensor], grads: &[Tensor], exp_avgs: &[Tensor], exp_avg_sqs: &[Tensor], steps: &[Tensor], hp: AdamWStep, found_inf: &Tensor) -> Result<()> {
    let n = params.len();
    assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n && steps.len() == n);
    let (p, g, m, v, s) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(steps));
    check(unsafe { ddpm_fused_adamw(p.as_ptr(), g.as_ptr(), m.as_ptr(), v.as_ptr(), s.as_ptr(), n, hp.lr, hp.beta1, hp.beta2, hp.weight_decay, hp.eps, ptr(found_inf)) })
}

/// √(Σ‖tᵢ‖²) over all tensors, as a 0-dim f32 tensor on their device.
pub fn global_norm(tensors: &[Tensor]) -> Result<Tensor> {
    let p = ptrs(tensors);
    let mut out: CTensor = std::ptr::null_mut();
    check(unsafe { ddpm_global_norm(p.as_ptr(), p.len(), &mut out) })?;
    // SAFETY: on success the binding hands over a heap-allocated at::Tensor.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// tᵢ *= factor (a 0-dim tensor on the same device).
pub fn foreach_mul_(tensors: &[Tensor], factor: &Tensor) -> Result<()> {
    let p = ptrs(tensors);
    check(unsafe { ddpm_foreach_mul_(p.as_ptr(), p.len(), ptr(factor)) })
}

/// targetᵢ += weight · (sourceᵢ − targetᵢ)
pub fn foreach_lerp_(targets: &[Tensor], sources: &[Tensor], weight: f64) -> Result<()> {
    assert_eq!(targets.len(), sources.len());
    let (t, s) = (ptrs(targets), ptrs(sources));
    check(unsafe { ddpm_foreach_lerp_(t.as_ptr(), s.as_ptr(), t.len(), weight) })
}

/// tᵢ = 0
pub fn foreach_zero_(tensors: &[Tensor]) -> Result<()> {
    let p = ptrs(tensors);
    check(unsafe { ddpm_foreach_zero_(p.as_ptr(), p.len()) })
}

/// gᵢ *= inv_scale, and found_inf = 1 if any gᵢ held inf or NaN (GradScaler's unscale).
pub fn amp_unscale_(grads: &[Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let p = ptrs(grads);
    check(unsafe { ddpm_amp_unscale_(p.as_ptr(), p.len(), ptr(found_inf), ptr(inv_scale)) })
}
