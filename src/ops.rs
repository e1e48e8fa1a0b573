//! Safe wrappers over the project's C++ binding (`csrc/ops.cpp`): dtype-aware autocast and the
//! multi-tensor kernels that keep the optimizer, clipping and EMA free of per-tensor host work.
use std::ffi::{c_char, c_int, CStr};

use anyhow::{anyhow, Result};
use tch::{Device, Tensor};

/// An `at::Tensor*`, opaque on this side.
pub(crate) type CTensor = *mut std::ffi::c_void;

extern "C" {
    fn ddpm_free_error(message: *mut c_char);
    fn ddpm_torch_version() -> *const c_char;
    fn ddpm_set_tf32(allowed: c_int) -> *mut c_char;
    fn ddpm_cuda_peak_memory(device: c_int, allocated: *mut i64, reserved: *mut i64)
        -> *mut c_char;
    fn ddpm_cuda_reset_peak_memory(device: c_int) -> *mut c_char;
    fn ddpm_cuda_empty_cache() -> *mut c_char;
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
    fn ddpm_foreach_lerp_(
        targets: *const CTensor,
        sources: *const CTensor,
        n: usize,
        weight: f64,
    ) -> *mut c_char;
    fn ddpm_foreach_zero_(tensors: *const CTensor, n: usize) -> *mut c_char;
    fn ddpm_group_norm_silu(
        x: CTensor,
        weight: CTensor,
        bias: CTensor,
        groups: i64,
        eps: f64,
        out: *mut CTensor,
    ) -> *mut c_char;
    fn ddpm_compile_fused_kernels(arch: *const c_char, cubin_bytes: *mut i64) -> *mut c_char;
    fn ddpm_load_fused_kernels(device: c_int) -> *mut c_char;
    fn ddpm_built_with_cuda() -> c_int;
    fn ddpm_foreach_copy_(
        targets: *const CTensor,
        sources: *const CTensor,
        n: usize,
    ) -> *mut c_char;
    fn ddpm_foreach_add_(targets: *const CTensor, sources: *const CTensor, n: usize)
        -> *mut c_char;
    fn ddpm_to_channels_last_(tensors: *const CTensor, n: usize) -> *mut c_char;
    fn ddpm_channels_last(tensor: CTensor, out: *mut CTensor) -> *mut c_char;
    fn ddpm_pin_memory(tensor: CTensor, out: *mut CTensor) -> *mut c_char;
    fn ddpm_amp_unscale_(
        grads: *const CTensor,
        n: usize,
        found_inf: CTensor,
        inv_scale: CTensor,
    ) -> *mut c_char;
}

/// Ok, or the binding's error message (which it allocated and this frees).
pub(crate) fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string allocated by the binding.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { ddpm_free_error(message) };
    Err(anyhow!("libtorch: {text}"))
}

pub(crate) fn ptrs(tensors: &[Tensor]) -> Vec<CTensor> {
    tensors.iter().map(|t| t.as_ptr() as CTensor).collect()
}

fn ptr(tensor: &Tensor) -> CTensor {
    tensor.as_ptr() as CTensor
}

/// The libtorch version this program runs on, e.g. "2.11.0".
pub fn torch_version() -> String {
    // SAFETY: a static NUL-terminated string in the binding.
    unsafe { CStr::from_ptr(ddpm_torch_version()) }
        .to_string_lossy()
        .into_owned()
}

/// Allows or forbids TF32 tensor-core math for f32 matmuls and convolutions.
pub fn set_tf32(allowed: bool) -> Result<()> {
    check(unsafe { ddpm_set_tf32(c_int::from(allowed)) })
}

/// Peak (allocated, reserved) bytes of the CUDA caching allocator on `device` since the last
/// `reset_cuda_peak_memory`.
pub fn cuda_peak_memory(device: usize) -> Result<(i64, i64)> {
    let (mut allocated, mut reserved) = (0i64, 0i64);
    check(unsafe { ddpm_cuda_peak_memory(device as c_int, &mut allocated, &mut reserved) })?;
    Ok((allocated, reserved))
}

pub fn reset_cuda_peak_memory(device: usize) -> Result<()> {
    check(unsafe { ddpm_cuda_reset_peak_memory(device as c_int) })
}

/// Hands the CUDA caching allocator's free blocks back to the driver.
pub fn cuda_empty_cache() -> Result<()> {
    check(unsafe { ddpm_cuda_empty_cache() })
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
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    hp: AdamWStep,
    found_inf: &Tensor,
) -> Result<()> {
    let n = params.len();
    assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n && steps.len() == n);
    let (p, g, m, v, s) = (
        ptrs(params),
        ptrs(grads),
        ptrs(exp_avgs),
        ptrs(exp_avg_sqs),
        ptrs(steps),
    );
    check(unsafe {
        ddpm_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.weight_decay,
            hp.eps,
            ptr(found_inf),
        )
    })
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

/// targetᵢ = sourceᵢ (converting the dtype where they differ).
pub fn foreach_copy_(targets: &[Tensor], sources: &[Tensor]) -> Result<()> {
    assert_eq!(targets.len(), sources.len());
    let (t, s) = (ptrs(targets), ptrs(sources));
    check(unsafe { ddpm_foreach_copy_(t.as_ptr(), s.as_ptr(), t.len()) })
}

/// targetᵢ += sourceᵢ (converting the dtype where they differ).
pub fn foreach_add_(targets: &[Tensor], sources: &[Tensor]) -> Result<()> {
    assert_eq!(targets.len(), sources.len());
    let (t, s) = (ptrs(targets), ptrs(sources));
    check(unsafe { ddpm_foreach_add_(t.as_ptr(), s.as_ptr(), t.len()) })
}

/// SiLU(GroupNorm(x)) for a contiguous 4-D f32 or bf16 CUDA tensor, in one fused kernel each
/// way (`csrc/group_norm_silu.cu`, compiled for the card on first use); differentiable.
pub fn group_norm_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: i64,
    eps: f64,
) -> Result<Tensor> {
    let mut out: CTensor = std::ptr::null_mut();
    check(unsafe { ddpm_group_norm_silu(ptr(x), ptr(weight), ptr(bias), groups, eps, &mut out) })?;
    // SAFETY: on success the binding hands over a heap-allocated at::Tensor.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// Whether this program was built with the CUDA headers (tools/setup.sh installs them), which
/// CUDA graphs, the fused kernels and NCCL need.
pub fn built_with_cuda() -> bool {
    unsafe { ddpm_built_with_cuda() != 0 }
}

/// Compiles the fused kernels for a CUDA device and loads them, unless done before: a missing
/// NVRTC or driver shows here rather than in the first forward pass.
pub fn load_fused_kernels(device: Device) -> Result<()> {
    match device {
        Device::Cuda(index) => check(unsafe { ddpm_load_fused_kernels(index as c_int) }),
        other => Err(anyhow!(
            "the fused kernels need a CUDA device, not {other:?}"
        )),
    }
}

/// Compiles the fused kernels for a GPU architecture (e.g. "sm_90") and returns the size of the
/// machine code; needs NVRTC, not a GPU.
pub fn compile_fused_kernels(arch: &str) -> Result<usize> {
    let arch = std::ffi::CString::new(arch)?;
    let mut bytes = 0i64;
    check(unsafe { ddpm_compile_fused_kernels(arch.as_ptr(), &mut bytes) })?;
    Ok(bytes as usize)
}

/// Re-lays the 4-D tensors out in channels-last memory order in place (values unchanged).
pub fn to_channels_last_(tensors: &[Tensor]) -> Result<()> {
    let p = ptrs(tensors);
    check(unsafe { ddpm_to_channels_last_(p.as_ptr(), p.len()) })
}

/// `tensor` (4-D) in channels-last memory order.
pub fn channels_last(tensor: &Tensor) -> Result<Tensor> {
    let mut out: CTensor = std::ptr::null_mut();
    check(unsafe { ddpm_channels_last(ptr(tensor), &mut out) })?;
    // SAFETY: on success the binding hands over a heap-allocated at::Tensor.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// A copy of the CPU tensor in page-locked memory, from which a copy to a CUDA device can be
/// queued without waiting for the device (needs a CUDA build and device).
pub fn pinned(tensor: &Tensor) -> Result<Tensor> {
    let mut out: CTensor = std::ptr::null_mut();
    check(unsafe { ddpm_pin_memory(ptr(tensor), &mut out) })?;
    // SAFETY: on success the binding hands over a heap-allocated at::Tensor.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn vec(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    #[test]
    fn autocast_runs_matmuls_in_the_chosen_dtype_and_only_inside() {
        let a = Tensor::randn([4, 4], (Kind::Float, Device::Cpu));
        assert_eq!(
            autocast(Device::Cpu, AutocastType::Bf16, || a.matmul(&a))
                .unwrap()
                .kind(),
            Kind::BFloat16
        );
        assert_eq!(
            autocast(Device::Cpu, AutocastType::Fp16, || a.matmul(&a))
                .unwrap()
                .kind(),
            Kind::Half
        );
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }

    #[test]
    fn fused_adamw_matches_the_update_rule() {
        let (lr, b1, b2, wd, eps) = (1e-2, 0.9, 0.999, 0.1, 1e-8);
        let p0 = [0.5f64, -1.0, 2.0];
        let g = [0.1f64, -0.3, 0.0];
        let params = [Tensor::from_slice(&p0).to_kind(Kind::Float)];
        let grads = [Tensor::from_slice(&g).to_kind(Kind::Float)];
        let m = [params[0].zeros_like()];
        let v = [params[0].zeros_like()];
        let steps = [Tensor::zeros([], (Kind::Float, Device::Cpu))];
        let no_inf = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let hp = AdamWStep {
            lr,
            beta1: b1,
            beta2: b2,
            weight_decay: wd,
            eps,
        };
        fused_adamw(&params, &grads, &m, &v, &steps, hp, &no_inf).unwrap();
        fused_adamw(&params, &grads, &m, &v, &steps, hp, &no_inf).unwrap();
        // Two steps of decoupled-weight-decay Adam in f64.
        let mut p = p0;
        let (mut mm, mut vv) = ([0.0; 3], [0.0; 3]);
        for step in 1..=2 {
            for i in 0..3 {
                p[i] *= 1.0 - lr * wd;
                mm[i] = b1 * mm[i] + (1.0 - b1) * g[i];
                vv[i] = b2 * vv[i] + (1.0 - b2) * g[i] * g[i];
                let (mh, vh) = (mm[i] / (1.0 - b1.powi(step)), vv[i] / (1.0 - b2.powi(step)));
                p[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        for (got, want) in vec(&params[0]).iter().zip(p) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(steps[0].double_value(&[]), 2.0);
        // With found_inf set nothing moves and the step count stays.
        let before = params[0].copy();
        fused_adamw(
            &params,
            &grads,
            &m,
            &v,
            &steps,
            hp,
            &Tensor::ones([1], (Kind::Float, Device::Cpu)),
        )
        .unwrap();
        assert!(params[0].equal(&before));
        assert_eq!(steps[0].double_value(&[]), 2.0);
    }

    #[test]
    fn norm_scale_lerp_and_zero_over_tensor_lists() {
        let a = [
            Tensor::from_slice(&[3.0f32, 0.0]),
            Tensor::from_slice(&[4.0f32]),
        ];
        assert!((global_norm(&a).unwrap().double_value(&[]) - 5.0).abs() < 1e-6);
        foreach_mul_(&a, &Tensor::from(0.5f32)).unwrap();
        assert_eq!(vec(&a[0]), vec![1.5, 0.0]);
        let target = [
            Tensor::from_slice(&[1.0f32, 1.0]),
            Tensor::from_slice(&[0.0f32]),
        ];
        foreach_lerp_(&target, &a, 0.25).unwrap();
        assert_eq!(vec(&target[0]), vec![1.125, 0.75]);
        assert_eq!(vec(&target[1]), vec![0.5]);
        foreach_zero_(&target).unwrap();
        assert_eq!(vec(&target[0]), vec![0.0, 0.0]);
    }

    #[test]
    fn fused_kernels_compile_for_hopper_and_ampere() {
        if !built_with_cuda() {
            let error = compile_fused_kernels("sm_90").unwrap_err().to_string();
            assert!(error.contains("built without the CUDA headers"), "{error}");
            return;
        }
        for arch in ["sm_90", "sm_80"] {
            let bytes = compile_fused_kernels(arch).unwrap();
            assert!(bytes > 1000, "{arch}: {bytes} bytes");
        }
        let error = compile_fused_kernels("sm_1").unwrap_err().to_string();
        assert!(error.contains("sm_1"), "{error}");
    }

    /// Page-locked memory comes from the CUDA driver (tools/gpu-check.sh runs the ignored tests).
    #[test]
    #[ignore = "needs a CUDA device"]
    fn pinned_copies_the_values_into_page_locked_memory() {
        let t = Tensor::from_slice(&[1u8, 2, 250]);
        let p = pinned(&t).unwrap();
        assert!(p.equal(&t) && p.is_pinned(Device::Cpu));
    }

    /// Needs a CUDA device (tools/gpu-check.sh runs the ignored tests there).
    #[test]
    #[ignore = "needs a CUDA device"]
    fn fused_group_norm_silu_matches_libtorch_on_cuda() {
        let device = Device::Cuda(0);
        assert!(tch::Cuda::is_available(), "no CUDA device");
        tch::manual_seed(3);
        let float = (Kind::Float, device);
        // (N, C, H, W, groups): wide and narrow groups, small and odd spatial sizes.
        let shapes = [
            (3, 64, 8, 8, 32),
            (2, 512, 4, 4, 32),
            (4, 96, 32, 32, 32),
            (1, 48, 5, 7, 16),
        ];
        // (activations, GroupNorm parameters, tolerance relative to the largest value): bf16
        // results are one rounding (2⁻⁹) from f32 ones; f32 weights with bf16 activations is
        // what autocast hands over.
        let cases = [
            (Kind::Float, Kind::Float, 1e-4),
            (Kind::BFloat16, Kind::BFloat16, 5e-3),
            (Kind::BFloat16, Kind::Float, 5e-3),
        ];
        for (kind, parameter_kind, tolerance) in cases {
            for (n, c, h, w, groups) in shapes {
                let leaf = |t: Tensor, kind: Kind| t.to_kind(kind).set_requires_grad(true);
                let x = leaf(Tensor::randn([n, c, h, w], float) * 2 + 0.5, kind);
                let weight = leaf(Tensor::randn([c], float) * 0.5 + 1, parameter_kind);
                let bias = leaf(Tensor::randn([c], float) * 0.5, parameter_kind);
                let dz = Tensor::randn([n, c, h, w], float)
                    .to_kind(kind)
                    .to_kind(Kind::Float);
                // The reference: libtorch's ops in f32 on the same (rounded) values.
                let f32_leaf = |t: &Tensor| t.detach().to_kind(Kind::Float).set_requires_grad(true);
                let (rx, rw, rb) = (f32_leaf(&x), f32_leaf(&weight), f32_leaf(&bias));
                let reference =
                    Tensor::group_norm(&rx, groups, Some(&rw), Some(&rb), 1e-6, true).silu();
                (&reference * &dz).sum(Kind::Float).backward();
                let z = group_norm_silu(&x, &weight, &bias, groups, 1e-6).unwrap();
                assert_eq!(z.kind(), kind);
                (z.to_kind(Kind::Float) * &dz).sum(Kind::Float).backward();
                assert_eq!(weight.grad().kind(), parameter_kind);
                let case = format!("{kind:?}/{parameter_kind:?} {n}x{c}x{h}x{w} groups {groups}");
                for (what, got, want) in [
                    ("output", z.detach(), reference.detach()),
                    ("dx", x.grad(), rx.grad()),
                    ("dweight", weight.grad(), rw.grad()),
                    ("dbias", bias.grad(), rb.grad()),
                ] {
                    let error = (got.to_kind(Kind::Float) - &want)
                        .abs()
                        .max()
                        .double_value(&[]);
                    let scale = want.abs().max().double_value(&[]);
                    assert!(
                        error <= tolerance * scale,
                        "{case} {what}: {error} of {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn copy_and_add_across_dtypes() {
        let master = [Tensor::from_slice(&[1.0f32 / 3.0, 1000.5])];
        let half = [Tensor::zeros([2], (Kind::BFloat16, Device::Cpu))];
        foreach_copy_(&half, &master).unwrap();
        assert_eq!(half[0].kind(), Kind::BFloat16);
        // bf16 keeps 8 significant bits: 1/3 → 0.333984375, 1000.5 → 1000.
        assert_eq!(vec(&half[0]), vec![0.333984375, 1000.0]);
        let sums = [Tensor::from_slice(&[0.5f32, 0.25])];
        foreach_add_(&sums, &half).unwrap();
        foreach_add_(&sums, &half).unwrap();
        assert_eq!(sums[0].kind(), Kind::Float);
        assert_eq!(vec(&sums[0]), vec![0.5 + 2.0 * 0.333984375, 2000.25]);
    }

    #[test]
    fn unscale_divides_and_flags_non_finite_gradients() {
        let grads = [Tensor::from_slice(&[2.0f32, 4.0])];
        let found = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        amp_unscale_(&grads, &found, &Tensor::from_slice(&[0.5f32])).unwrap();
        assert_eq!(vec(&grads[0]), vec![1.0, 2.0]);
        assert_eq!(found.double_value(&[0]), 0.0);
        let bad = [Tensor::from_slice(&[f32::NAN])];
        amp_unscale_(&bad, &found, &Tensor::from_slice(&[0.5f32])).unwrap();
        assert_eq!(found.double_value(&[0]), 1.0);
    }

    #[test]
    fn reports_the_libtorch_version() {
        assert!(torch_version().starts_with("2."), "{}", torch_version());
    }
}
