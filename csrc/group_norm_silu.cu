// GroupNorm followed by SiLU in one pass over the activations, forward and backward, for
// contiguous NCHW tensors of f32 or bf16 (bf16 travels as its 16 bits; statistics, affine
// parameters and sums are f32). Compiled at run time with NVRTC (csrc/fused_ops.cpp), so it
// includes nothing. One block per (sample, group): a group's C/G channels are one contiguous
// run of D = C/G * H*W values.
//
// Forward:  x̂ = (x − μ)·rstd, y = γ_c x̂ + β_c, z = y·σ(y); μ and rstd are kept for backward.
// Backward: dy = dz·σ(y)·(1 + y·(1 − σ(y))); per channel dγ_c = Σ dy·x̂, dβ_c = Σ dy (one row per
// sample, summed over samples by the caller); dx = rstd·(γ_c dy − A/D − x̂·B/D) with
// A = Σ_c γ_c dβ_c and B = Σ_c γ_c dγ_c over the group's channels.

constexpr int kThreads = 256;

__device__ __forceinline__ float load(const float *p, long i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short *p, long i) {
  return __uint_as_float(static_cast<unsigned>(p[i]) << 16);
}
__device__ __forceinline__ void store(float *p, long i, float v) { p[i] = v; }
// Round to nearest even, as PyTorch's float → bf16 conversion does; NaN stays NaN.
__device__ __forceinline__ void store(unsigned short *p, long i, float v) {
  unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i] = static_cast<unsigned short>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i] = static_cast<unsigned short>(u >> 16);
}

__device__ __forceinline__ float sigmoid(float y) { return 1.0f / (1.0f + __expf(-y)); }

// The sums of `v` over the block, returned to every thread. `scratch` holds kThreads / 32 pairs.
__device__ float2 block_sum(float2 v, float2 *scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads(); // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float2 total = make_float2(0.0f, 0.0f);
  for (int w = 0; w < kThreads / 32; ++w) {
    total.x += scratch[w].x;
    total.y += scratch[w].y;
  }
  return total;
}

template <typename T>
__device__ void forward(const T *x, const float *gamma, const float *beta, T *z, float *mean_out,
                        float *rstd_out, int channels, int groups, int hw, float eps) {
  __shared__ float2 scratch[kThreads / 32];
  const int group_channels = channels / groups;
  const int d = group_channels * hw; // the caller keeps tensors under 2^31 elements
  const long base = static_cast<long>(blockIdx.x) * d; // blockIdx.x = n * groups + g
  const int first_channel = (blockIdx.x % groups) * group_channels;
  float sum = 0.0f;
  for (int i = threadIdx.x; i < d; i += kThreads) sum += load(x, base + i);
  const float mean = block_sum(make_float2(sum, 0.0f), scratch).x / d;
  float squares = 0.0f;
  for (int i = threadIdx.x; i < d; i += kThreads) {
    const float c = load(x, base + i) - mean;
    squares += c * c;
  }
  const float rstd = rsqrtf(block_sum(make_float2(squares, 0.0f), scratch).x / d + eps);
  for (int i = threadIdx.x; i < d; i += kThreads) {
    const int c = first_channel + i / hw;
    const float y = (load(x, base + i) - mean) * rstd * gamma[c] + beta[c];
    store(z, base + i, y * sigmoid(y));
  }
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

template <typename T>
__device__ void backward(const T *dz, const T *x, const float *gamma, const float *beta,
                         const float *mean_in, const float *rstd_in, T *dx, float *dgamma_rows,
                         float *dbeta_rows, int channels, int groups, int hw) {
  __shared__ float2 scratch[kThreads / 32];
  const int group_channels = channels / groups;
  const int d = group_channels * hw;
  const long base = static_cast<long>(blockIdx.x) * d;
  const int sample = blockIdx.x / groups;
  const int first_channel = (blockIdx.x % groups) * group_channels;
  const float mean = mean_in[blockIdx.x], rstd = rstd_in[blockIdx.x];
  float a = 0.0f, b = 0.0f; // the group's Σ γ dβ and Σ γ dγ, on every thread
  for (int k = 0; k < group_channels; ++k) {
    const int c = first_channel + k;
    const long start = base + static_cast<long>(k) * hw;
    float dgamma = 0.0f, dbeta = 0.0f;
    for (int p = threadIdx.x; p < hw; p += kThreads) {
      const float xhat = (load(x, start + p) - mean) * rstd;
      const float y = xhat * gamma[c] + beta[c];
      const float s = sigmoid(y);
      const float dy = load(dz, start + p) * s * (1.0f + y * (1.0f - s));
      dgamma += dy * xhat;
      dbeta += dy;
    }
    const float2 sums = block_sum(make_float2(dgamma, dbeta), scratch);
    dgamma = sums.x;
    dbeta = sums.y;
    if (threadIdx.x == 0) {
      dgamma_rows[static_cast<long>(sample) * channels + c] = dgamma;
      dbeta_rows[static_cast<long>(sample) * channels + c] = dbeta;
    }
    a += gamma[c] * dbeta;
    b += gamma[c] * dgamma;
  }
  a /= d;
  b /= d;
  for (int i = threadIdx.x; i < d; i += kThreads) {
    const int c = first_channel + i / hw;
    const float xhat = (load(x, base + i) - mean) * rstd;
    const float y = xhat * gamma[c] + beta[c];
    const float s = sigmoid(y);
    const float dy = load(dz, base + i) * s * (1.0f + y * (1.0f - s));
    store(dx, base + i, rstd * (gamma[c] * dy - a - xhat * b));
  }
}

extern "C" __global__ void __launch_bounds__(kThreads)
group_norm_silu_forward_f32(const float *x, const float *gamma, const float *beta, float *z,
                            float *mean, float *rstd, int channels, int groups, int hw,
                            float eps) {
  forward(x, gamma, beta, z, mean, rstd, channels, groups, hw, eps);
}

extern "C" __global__ void __launch_bounds__(kThreads)
group_norm_silu_forward_bf16(const unsigned short *x, const float *gamma, const float *beta,
                             unsigned short *z, float *mean, float *rstd, int channels,
                             int groups, int hw, float eps) {
  forward(x, gamma, beta, z, mean, rstd, channels, groups, hw, eps);
}

extern "C" __global__ void __launch_bounds__(kThreads)
group_norm_silu_backward_f32(const float *dz, const float *x, const float *gamma,
                             const float *beta, const float *mean, const float *rstd, float *dx,
                             float *dgamma_rows, float *dbeta_rows, int channels, int groups,
                             int hw) {
  backward(dz, x, gamma, beta, mean, rstd, dx, dgamma_rows, dbeta_rows, channels, groups, hw);
}

extern "C" __global__ void __launch_bounds__(kThreads)
group_norm_silu_backward_bf16(const unsigned short *dz, const unsigned short *x,
                              const float *gamma, const float *beta, const float *mean,
                              const float *rstd, unsigned short *dx, float *dgamma_rows,
                              float *dbeta_rows, int channels, int groups, int hw) {
  backward(dz, x, gamma, beta, mean, rstd, dx, dgamma_rows, dbeta_rows, channels, groups, hw);
}
