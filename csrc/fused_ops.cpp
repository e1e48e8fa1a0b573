// Fused CUDA kernels that libtorch lacks (csrc/group_norm_silu.cu), compiled at run time with
// NVRTC for the card at hand and launched through the CUDA driver API, both loaded with dlopen so
// that the binary links neither (they ship with the torch wheel and the driver). The fused op is
// an autograd function, so it trains like the unfused ops it replaces and can be recorded in a
// CUDA graph once compiled.
#include "binding.h"

#ifdef DDPM_WITH_CUDA
#include "kernel_sources.h"

#include <ATen/cuda/CUDAContextLight.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <nvrtc.h>
#include <torch/csrc/autograd/custom_function.h>

#include <dlfcn.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

// The first of `paths` that dlopen accepts, or an error naming what was tried.
void *open_library(const std::vector<std::string> &paths) {
  std::string tried;
  for (const auto &path : paths) {
    if (void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) return handle;
    tried += "\n  " + path + ": " + dlerror();
  }
  TORCH_CHECK(false, "cannot load a library the fused kernels need:", tried);
}

template <typename F> F symbol(void *library, const char *name) {
  void *address = dlsym(library, name);
  TORCH_CHECK(address != nullptr, "symbol ", name, " missing: ", dlerror());
  return reinterpret_cast<F>(address);
}

// The folder of the library holding `address`.
std::string folder_of(void *address) {
  Dl_info info;
  TORCH_CHECK(dladdr(address, &info) != 0 && info.dli_fname != nullptr,
              "cannot locate a loaded library");
  std::string path = info.dli_fname;
  return path.substr(0, path.rfind('/'));
}

struct Nvrtc {
  decltype(&nvrtcCreateProgram) create;
  decltype(&nvrtcCompileProgram) compile;
  decltype(&nvrtcGetProgramLogSize) log_size;
  decltype(&nvrtcGetProgramLog) log;
  decltype(&nvrtcGetCUBINSize) cubin_size;
  decltype(&nvrtcGetCUBIN) cubin;
  decltype(&nvrtcDestroyProgram) destroy;
  decltype(&nvrtcGetErrorString) error;
};

const Nvrtc &nvrtc() {
  static const Nvrtc api = [] {
    // The wheel keeps NVRTC in ../../nvidia/cu13/lib from libtorch_cuda.so.
    auto torch_lib = folder_of(reinterpret_cast<void *>(&at::cuda::getDeviceProperties));
    void *lib =
        open_library({"libnvrtc.so.13", torch_lib + "/../../nvidia/cu13/lib/libnvrtc.so.13"});
    // NVRTC opens its builtins library by name at compile time; where that would not find it
    // (the wheel's folder is on no search path), load it from NVRTC's folder first.
    int major = 0, minor = 0;
    symbol<decltype(&nvrtcVersion)>(lib, "nvrtcVersion")(&major, &minor);
    auto builtins = "libnvrtc-builtins.so." + std::to_string(major) + "." + std::to_string(minor);
    auto nvrtc_dir = folder_of(dlsym(lib, "nvrtcCreateProgram"));
    if (!dlopen(builtins.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
      dlopen((nvrtc_dir + "/" + builtins).c_str(), RTLD_NOW | RTLD_GLOBAL);
    }
    return Nvrtc{symbol<decltype(&nvrtcCreateProgram)>(lib, "nvrtcCreateProgram"),
                 symbol<decltype(&nvrtcCompileProgram)>(lib, "nvrtcCompileProgram"),
                 symbol<decltype(&nvrtcGetProgramLogSize)>(lib, "nvrtcGetProgramLogSize"),
                 symbol<decltype(&nvrtcGetProgramLog)>(lib, "nvrtcGetProgramLog"),
                 symbol<decltype(&nvrtcGetCUBINSize)>(lib, "nvrtcGetCUBINSize"),
                 symbol<decltype(&nvrtcGetCUBIN)>(lib, "nvrtcGetCUBIN"),
                 symbol<decltype(&nvrtcDestroyProgram)>(lib, "nvrtcDestroyProgram"),
                 symbol<decltype(&nvrtcGetErrorString)>(lib, "nvrtcGetErrorString")};
  }();
  return api;
}

void check_nvrtc(nvrtcResult result, const char *what) {
  TORCH_CHECK(result == NVRTC_SUCCESS, what, ": ", nvrtc().error(result));
}

// The kernels as a CUBIN for `arch` (e.g. "sm_90"); compiler errors come with NVRTC's log.
std::string compile(const std::string &arch) {
  const auto &api = nvrtc();
  nvrtcProgram program;
  check_nvrtc(api.create(&program, kGroupNormSiluSource, "group_norm_silu.cu", 0, nullptr, nullptr),
              "nvrtcCreateProgram");
  std::string arch_option = "--gpu-architecture=" + arch;
  const char *options[] = {arch_option.c_str(), "--std=c++17"};
  nvrtcResult compiled = api.compile(program, 2, options);
  if (compiled != NVRTC_SUCCESS) {
    size_t size = 0;
    api.log_size(program, &size);
    std::string log(size, '\0');
    api.log(program, log.data());
    api.destroy(&program);
    TORCH_CHECK(false, "compiling csrc/group_norm_silu.cu for ", arch, " failed: ", log);
  }
  size_t size = 0;
  check_nvrtc(api.cubin_size(program, &size), "nvrtcGetCUBINSize");
  std::string cubin(size, '\0');
  check_nvrtc(api.cubin(program, cubin.data()), "nvrtcGetCUBIN");
  api.destroy(&program);
  return cubin;
}

struct Driver {
  decltype(&cuModuleLoadData) load;
  decltype(&cuModuleGetFunction) function;
  decltype(&cuLaunchKernel) launch;
  decltype(&cuGetErrorString) error;
  decltype(&cuCtxGetCurrent) current_context;
  decltype(&cuCtxSetCurrent) set_context;
  decltype(&cuDeviceGet) device;
  decltype(&cuDevicePrimaryCtxRetain) primary_context;
};

const Driver &driver() {
  static const Driver api = [] {
    void *lib = open_library({"libcuda.so.1"});
    return Driver{symbol<decltype(&cuModuleLoadData)>(lib, "cuModuleLoadData"),
                  symbol<decltype(&cuModuleGetFunction)>(lib, "cuModuleGetFunction"),
                  symbol<decltype(&cuLaunchKernel)>(lib, "cuLaunchKernel"),
                  symbol<decltype(&cuGetErrorString)>(lib, "cuGetErrorString"),
                  symbol<decltype(&cuCtxGetCurrent)>(lib, "cuCtxGetCurrent"),
                  symbol<decltype(&cuCtxSetCurrent)>(lib, "cuCtxSetCurrent"),
                  symbol<decltype(&cuDeviceGet)>(lib, "cuDeviceGet"),
                  symbol<decltype(&cuDevicePrimaryCtxRetain)>(lib, "cuDevicePrimaryCtxRetain")};
  }();
  return api;
}

void check_cu(CUresult result, const char *what) {
  if (result == CUDA_SUCCESS) return;
  const char *text = "unknown error";
  driver().error(result, &text);
  TORCH_CHECK(false, what, ": ", text);
}

struct Kernels {
  // The device's primary context (the one libtorch's runtime calls use), which the module is in.
  CUcontext context;
  CUfunction forward_f32, forward_bf16, backward_f32, backward_bf16;
};

// Driver calls need a current context, which a thread that only went through the runtime API
// (the autograd engine's, say) may not have bound yet, or may have bound for another device.
void make_current(CUcontext context) {
  CUcontext current = nullptr;
  check_cu(driver().current_context(&current), "cuCtxGetCurrent");
  if (current != context) check_cu(driver().set_context(context), "cuCtxSetCurrent");
}

// The kernels for `device`, compiled and loaded on first use.
const Kernels &kernels(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, Kernels> loaded;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = loaded.find(device);
  if (found != loaded.end()) return found->second;
  const auto &api = driver();
  CUdevice handle;
  check_cu(api.device(&handle, device), "cuDeviceGet");
  Kernels k{};
  check_cu(api.primary_context(&k.context, handle), "cuDevicePrimaryCtxRetain");
  make_current(k.context);
  const auto *props = at::cuda::getDeviceProperties(device);
  std::string cubin = compile("sm_" + std::to_string(props->major) + std::to_string(props->minor));
  CUmodule module;
  check_cu(api.load(&module, cubin.data()), "cuModuleLoadData");
  auto get = [&](const char *name) {
    CUfunction f;
    check_cu(api.function(&f, module, name), name);
    return f;
  };
  k.forward_f32 = get("group_norm_silu_forward_f32");
  k.forward_bf16 = get("group_norm_silu_forward_bf16");
  k.backward_f32 = get("group_norm_silu_backward_f32");
  k.backward_bf16 = get("group_norm_silu_backward_bf16");
  return loaded.emplace(device, k).first->second;
}

constexpr unsigned kThreads = 256; // as in the kernel source

// Launches on `device`'s current stream, one block per (sample, group).
void launch(const Kernels &k, CUfunction f, int64_t blocks, std::vector<void *> args,
            c10::DeviceIndex device) {
  make_current(k.context);
  auto stream = reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(device).stream());
  check_cu(driver().launch(f, static_cast<unsigned>(blocks), 1, 1, kThreads, 1, 1, 0, stream,
                           args.data(), nullptr),
           "cuLaunchKernel");
}

void check_input(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &bias,
                 int64_t groups) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "fused GroupNorm+SiLU takes a 4-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "fused GroupNorm+SiLU takes f32 or bf16, not ", x.scalar_type());
  TORCH_CHECK(x.size(0) > 0 && x.numel() < (int64_t{1} << 31), "fused GroupNorm+SiLU: size");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "channels not divisible by the groups");
  TORCH_CHECK(weight.numel() == x.size(1) && bias.numel() == x.size(1),
              "GroupNorm weight and bias need one value per channel");
}

struct GroupNormSiLU : public torch::autograd::Function<GroupNormSiLU> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &input,
                            const at::Tensor &weight, const at::Tensor &bias, int64_t groups,
                            double eps) {
    check_input(input, weight, bias, groups);
    c10::DeviceGuard guard(input.device());
    auto x = input.contiguous();
    auto gamma = weight.to(at::kFloat).contiguous(), beta = bias.to(at::kFloat).contiguous();
    int n = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3), g = groups;
    float epsilon = static_cast<float>(eps);
    auto z = at::empty_like(x);
    auto stats = x.options().dtype(at::kFloat);
    auto mean = at::empty({n * g}, stats), rstd = at::empty({n * g}, stats);
    void *xp = x.data_ptr(), *gp = gamma.data_ptr(), *bp = beta.data_ptr(), *zp = z.data_ptr();
    void *mp = mean.data_ptr(), *rp = rstd.data_ptr();
    const auto &k = kernels(x.device().index());
    launch(k, x.scalar_type() == at::kFloat ? k.forward_f32 : k.forward_bf16, n * g,
           {&xp, &gp, &bp, &zp, &mp, &rp, &channels, &g, &hw, &epsilon}, x.device().index());
    ctx->save_for_backward({x, gamma, beta, mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["weight_type"] = static_cast<int64_t>(weight.scalar_type());
    return z;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto &x = saved[0], &gamma = saved[1], &beta = saved[2], &mean = saved[3], &rstd = saved[4];
    c10::DeviceGuard guard(x.device());
    auto dz = grads[0].to(x.scalar_type()).contiguous();
    int n = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
    int g = ctx->saved_data["groups"].toInt();
    auto dx = at::empty_like(x);
    auto rows = at::empty({2, n, channels}, x.options().dtype(at::kFloat));
    void *dzp = dz.data_ptr(), *xp = x.data_ptr(), *gp = gamma.data_ptr(), *bp = beta.data_ptr();
    void *mp = mean.data_ptr(), *rp = rstd.data_ptr(), *dxp = dx.data_ptr();
    void *dgp = rows[0].data_ptr(), *dbp = rows[1].data_ptr();
    const auto &k = kernels(x.device().index());
    launch(k, x.scalar_type() == at::kFloat ? k.backward_f32 : k.backward_bf16, n * g,
           {&dzp, &xp, &gp, &bp, &mp, &rp, &dxp, &dgp, &dbp, &channels, &g, &hw},
           x.device().index());
    auto weight_type = static_cast<at::ScalarType>(ctx->saved_data["weight_type"].toInt());
    return {dx, rows[0].sum(0).to(weight_type), rows[1].sum(0).to(weight_type), at::Tensor(),
            at::Tensor()};
  }
};

} // namespace

extern "C" {

// SiLU(GroupNorm(x)) with affine weight and bias, through the fused kernels (differentiable).
char *ddpm_group_norm_silu(at::Tensor *x, at::Tensor *weight, at::Tensor *bias, int64_t groups,
                           double eps, at::Tensor **out) {
  DDPM_TRY({ *out = new at::Tensor(GroupNormSiLU::apply(*x, *weight, *bias, groups, eps)); })
}

int ddpm_built_with_cuda() { return 1; }

// Compiles and loads the fused kernels for a CUDA device, if they are not loaded yet.
char *ddpm_load_fused_kernels(int device) {
  DDPM_TRY({ kernels(static_cast<c10::DeviceIndex>(device)); })
}

// Compiles the fused kernels for `arch` (e.g. "sm_90") without loading them; needs no GPU.
char *ddpm_compile_fused_kernels(const char *arch, int64_t *cubin_bytes) {
  DDPM_TRY({ *cubin_bytes = static_cast<int64_t>(compile(arch).size()); })
}

} // extern "C"

#else

namespace {
char *unavailable() {
  return ddpm::error_message("fused kernels are unavailable: this program was built without "
                             "the CUDA headers (tools/setup.sh installs them)");
}
} // namespace

extern "C" {
int ddpm_built_with_cuda() { return 0; }
char *ddpm_group_norm_silu(at::Tensor *, at::Tensor *, at::Tensor *, int64_t, double,
                           at::Tensor **) {
  return unavailable();
}
char *ddpm_load_fused_kernels(int) { return unavailable(); }
char *ddpm_compile_fused_kernels(const char *, int64_t *) { return unavailable(); }
} // extern "C"

#endif
