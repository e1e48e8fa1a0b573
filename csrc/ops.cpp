// The few libtorch entry points that tch does not expose: dtype-aware autocast and the
// multi-tensor (foreach / fused) kernels used by the optimizer, gradient clipping and EMA.
#include "binding.h"

#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/headeronly/version.h>

namespace {

using ddpm::list;

at::DeviceType device_type(int cuda) { return cuda ? at::kCUDA : at::kCPU; }

at::ScalarType scalar_type(int code) {
  switch (code) {
  case 1: return at::kBFloat16;
  case 2: return at::kHalf;
  default: return at::kFloat;
  }
}

} // namespace

extern "C" {

void ddpm_free_error(char *message) { free(message); }

const char *ddpm_torch_version() { return TORCH_VERSION; }

// Lets f32 matmuls and convolutions use TF32 tensor cores (CUDA), or forbids it.
char *ddpm_set_tf32(int allowed) {
  DDPM_TRY({
    at::globalContext().setAllowTF32CuBLAS(allowed != 0);
    at::globalContext().setAllowTF32CuDNN(allowed != 0);
  })
}

// Turns autocast on for one device type with the given dtype (1 = bf16, 2 = f16).
char *ddpm_autocast_enter(int cuda, int dtype) {
  DDPM_TRY({
    at::autocast::set_autocast_dtype(device_type(cuda), scalar_type(dtype));
    at::autocast::set_autocast_enabled(device_type(cuda), true);
    at::autocast::increment_nesting();
  })
}

// Leaves autocast; the cast-weight cache is dropped when the outermost region ends.
char *ddpm_autocast_exit(int cuda) {
  DDPM_TRY({
    at::autocast::set_autocast_enabled(device_type(cuda), false);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  })
}

// One AdamW step over all parameters (decoupled weight decay, bias-corrected moments).
// Where the 0-dim `found_inf` is non-zero, the kernel leaves parameters and moments alone and
// the step counts are restored, all on the device.
char *ddpm_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                       at::Tensor **exp_avg_sqs, at::Tensor **steps, size_t n, double lr,
                       double beta1, double beta2, double weight_decay, double eps,
                       at::Tensor *found_inf) {
  DDPM_TRY({
    auto step_list = list(steps, n);
    at::_foreach_add_(step_list, 1.0);
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n),
                      {}, step_list, lr, beta1, beta2, weight_decay, eps, false, false,
                      std::nullopt, *found_inf);
    at::_foreach_sub_(step_list, std::vector<at::Tensor>(n, found_inf->reshape({})));
  })
}

// The global L2 norm of all tensors, as a new 0-dim f32 tensor (no host synchronisation).
char *ddpm_global_norm(at::Tensor **tensors, size_t n, at::Tensor **out) {
  DDPM_TRY({
    auto norms = at::_foreach_norm(list(tensors, n), 2, at::kFloat);
    *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
  })
}

// tensors[i] *= factor, with factor a 0-dim tensor on the tensors' device.
char *ddpm_foreach_mul_(at::Tensor **tensors, size_t n, at::Tensor *factor) {
  DDPM_TRY({ at::_foreach_mul_(list(tensors, n), *factor); })
}

// targets[i] += weight * (sources[i] - targets[i]); EMA with weight = 1 - decay.
char *ddpm_foreach_lerp_(at::Tensor **targets, at::Tensor **sources, size_t n,
                         double weight) {
  DDPM_TRY({ at::_foreach_lerp_(list(targets, n), list(sources, n), at::Scalar(weight)); })
}

// Re-lays each 4-D tensor out in channels-last (NHWC) memory order, keeping its values; the
// tensors stay the same objects (a variable's data is swapped).
char *ddpm_to_channels_last_(at::Tensor **tensors, size_t n) {
  DDPM_TRY({
    for (auto &t : list(tensors, n)) {
      if (t.dim() == 4) t.set_data(t.contiguous(at::MemoryFormat::ChannelsLast));
    }
  })
}

// *out = tensor in channels-last memory order (itself when it already is).
char *ddpm_channels_last(at::Tensor *tensor, at::Tensor **out) {
  DDPM_TRY({ *out = new at::Tensor(tensor->contiguous(at::MemoryFormat::ChannelsLast)); })
}

// *out = a copy of tensor in page-locked host memory, from libtorch's caching host allocator
// (which keeps a block until the copies from it that were queued have run).
char *ddpm_pin_memory(at::Tensor *tensor, at::Tensor **out) {
  DDPM_TRY({ *out = new at::Tensor(tensor->pin_memory()); })
}

// targets[i] = sources[i], converting the dtype where they differ.
char *ddpm_foreach_copy_(at::Tensor **targets, at::Tensor **sources, size_t n) {
  DDPM_TRY({ at::_foreach_copy_(list(targets, n), list(sources, n), false); })
}

// targets[i] += sources[i], converting the dtype where they differ.
char *ddpm_foreach_add_(at::Tensor **targets, at::Tensor **sources, size_t n) {
  DDPM_TRY({ at::_foreach_add_(list(targets, n), list(sources, n), 1); })
}

// tensors[i] = 0
char *ddpm_foreach_zero_(at::Tensor **tensors, size_t n) {
  DDPM_TRY({ at::_foreach_zero_(list(tensors, n)); })
}

// grads *= inv_scale; found_inf = 1 if any gradient holds inf or NaN.
char *ddpm_amp_unscale_(at::Tensor **grads, size_t n, at::Tensor *found_inf,
                        at::Tensor *inv_scale) {
  DDPM_TRY({ at::_amp_foreach_non_finite_check_and_unscale_(list(grads, n), *found_inf, *inv_scale); })
}

// Peak bytes allocated and reserved by the CUDA caching allocator since the last reset.
char *ddpm_cuda_peak_memory(int device, int64_t *allocated, int64_t *reserved) {
  DDPM_TRY({
    auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(device);
    auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[aggregate].peak;
    *reserved = stats.reserved_bytes[aggregate].peak;
  })
}

char *ddpm_cuda_reset_peak_memory(int device) {
  DDPM_TRY({ c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(device); })
}

// Returns the caching allocator's unused blocks to the driver (after an out-of-memory try).
char *ddpm_cuda_empty_cache() {
  DDPM_TRY({ c10::getDeviceAllocator(c10::DeviceType::CUDA)->emptyCache(); })
}

} // extern "C"
