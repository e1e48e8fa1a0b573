// Data-parallel communication through libtorch's c10d: a TCPStore for the rendezvous, and an NCCL
// (CUDA tensors; where the build found its headers) or Gloo (CPU tensors, and CUDA tensors through
// host staging) process group for the collectives, and c10d's Reducer (what PyTorch's
// DistributedDataParallel runs on) to average gradients in buckets while backward still runs.
#include "binding.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef DDPM_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <c10/util/Logging.h>

#include <chrono>
#include <string>

namespace {

struct Group {
  // The process group the Reducer talks to, and its one backend, which the other collectives use.
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  c10::intrusive_ptr<c10d::Backend> backend;
  int world;
};

// A process group whose every device type goes to `backend`.
c10::intrusive_ptr<c10d::ProcessGroup> group_of(const c10::intrusive_ptr<c10d::Store> &store,
                                               int rank, int world,
                                               const c10::intrusive_ptr<c10d::Backend> &backend,
                                               bool nccl) {
  using Type = c10d::ProcessGroup::BackendType;
  auto type = nccl ? Type::NCCL : Type::GLOO;
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
  group->setDefaultBackend(type);
  group->setBackend(c10::DeviceType::CUDA, type, backend);
  if (!nccl) group->setBackend(c10::DeviceType::CPU, type, backend);
  group->setGroupName("ddpm");
  return group;
}

bool is_loopback(const std::string &host) {
  return host == "127.0.0.1" || host == "localhost" || host == "::1";
}

// Runs `collective` on consecutive runs of same-dtype, same-device tensors, each run flattened
// into one buffer of at most `bucket_bytes` (a tensor larger than that gets its own), all
// buckets in flight at once; then `finish` copies each buffer back.
template <typename Collective>
void bucketed(at::Tensor **tensors, size_t n, int64_t bucket_bytes, Collective collective,
              double scale) {
  auto all = ddpm::list(tensors, n);
  std::vector<std::pair<size_t, size_t>> ranges;
  for (size_t start = 0; start < n;) {
    size_t end = start + 1;
    int64_t bytes = all[start].nbytes();
    while (end < n && all[end].scalar_type() == all[start].scalar_type() &&
           all[end].device() == all[start].device() &&
           bytes + static_cast<int64_t>(all[end].nbytes()) <= bucket_bytes) {
      bytes += all[end].nbytes();
      ++end;
    }
    ranges.emplace_back(start, end);
    start = end;
  }
  std::vector<at::Tensor> buffers;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (auto [start, end] : ranges) {
    std::vector<at::Tensor> flat;
    for (size_t i = start; i < end; ++i) flat.push_back(all[i].reshape({-1}));
    std::vector<at::Tensor> buffer{at::cat(flat)};
    works.push_back(collective(buffer));
    buffers.push_back(buffer[0]);
  }
  for (size_t b = 0; b < ranges.size(); ++b) {
    works[b]->wait();
    if (scale != 1.0) buffers[b].mul_(scale);
    int64_t offset = 0;
    for (size_t i = ranges[b].first; i < ranges[b].second; ++i) {
      auto numel = all[i].numel();
      all[i].copy_(buffers[b].narrow(0, offset, numel).view(all[i].sizes()));
      offset += numel;
    }
  }
}

c10::intrusive_ptr<c10d::Backend> gloo_backend(const c10::intrusive_ptr<c10d::Store> &store,
                                               const std::string &host, int rank, int world,
                                               std::chrono::milliseconds timeout) {
  auto options = is_loopback(host) ? c10d::ProcessGroupGloo::Options::create(timeout)
                                   : c10d::ProcessGroupGloo::Options::create_default(timeout);
  if (is_loopback(host)) {
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  }
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
}

c10::intrusive_ptr<c10d::Backend> nccl_backend(const c10::intrusive_ptr<c10d::Store> &store,
                                               int rank, int world,
                                               std::chrono::milliseconds timeout) {
#ifdef DDPM_WITH_NCCL
  // Without blocking wait, Work::wait only orders the CUDA streams and a lost peer surfaces as
  // the watchdog aborting the process; with it, wait() throws, so training can stop cleanly.
  setenv("TORCH_NCCL_BLOCKING_WAIT", "1", /*overwrite=*/0);
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
#else
  TORCH_CHECK(false, "this ddpm was built without the NCCL headers (run tools/setup.sh and "
                     "rebuild), or set DDPM_DIST_BACKEND=gloo");
#endif
}

} // namespace

extern "C" {

int ddpm_nccl_available() {
#ifdef DDPM_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the group of `world` processes whose rank 0 serves (or, when `agent_store`, whose
// launcher already serves) the TCPStore at host:port. Every wait, the rendezvous and each
// collective included, gives up after `timeout_ms`.
char *ddpm_group_new(const char *host, int port, int rank, int world, int agent_store,
                     const char *prefix, int64_t timeout_ms, int nccl, void **out) {
  DDPM_TRY({
    // c10d logs every failed connection attempt with a C++ stack trace; the error returned
    // when the rendezvous gives up says what the user needs, once.
    struct QuietLogs {
      int saved = FLAGS_caffe2_log_level;
      QuietLogs() { FLAGS_caffe2_log_level = 3; }
      ~QuietLogs() { FLAGS_caffe2_log_level = saved; }
    } quiet;
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(port);
    options.isServer = rank == 0 && !agent_store;
    options.numWorkers = world;
    options.waitWorkers = !agent_store;
    options.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(host, options);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(prefix, tcp);
    auto backend = nccl ? nccl_backend(store, rank, world, timeout)
                        : gloo_backend(store, host, rank, world, timeout);
    *out = new Group{group_of(store, rank, world, backend, nccl), backend, world};
  })
}

// Frees a group. Only for a group whose collectives all finished: the destructor waits for them.
void ddpm_group_free(void *group) { delete static_cast<Group *>(group); }

// tᵢ = mean over ranks of tᵢ.
char *ddpm_group_all_reduce_mean(void *group, at::Tensor **tensors, size_t n,
                                 int64_t bucket_bytes) {
  DDPM_TRY({
    auto g = static_cast<Group *>(group);
    bucketed(
        tensors, n, bucket_bytes,
        [&](std::vector<at::Tensor> &buffer) { return g->backend->allreduce(buffer); },
        1.0 / g->world);
  })
}

// tᵢ = rank `root`'s tᵢ.
char *ddpm_group_broadcast(void *group, at::Tensor **tensors, size_t n, int root,
                           int64_t bucket_bytes) {
  DDPM_TRY({
    auto g = static_cast<Group *>(group);
    c10d::BroadcastOptions options;
    options.rootRank = root;
    bucketed(
        tensors, n, bucket_bytes,
        [&](std::vector<at::Tensor> &buffer) { return g->backend->broadcast(buffer, options); },
        1.0);
  })
}

// A Reducer over `params` (leaf tensors that require grad): once armed by ddpm_reducer_arm, the
// next backward pass averages their gradients over the ranks, bucket by bucket as soon as a
// bucket's gradients are ready, and leaves the means in their .grad.
char *ddpm_reducer_new(void *group, at::Tensor **params, size_t n, int64_t bucket_bytes,
                       void **out) {
  DDPM_TRY({
    auto tensors = ddpm::list(params, n);
    // Like DistributedDataParallel: a small first bucket, so communication starts early.
    const int64_t first_bucket_bytes = 1 << 20;
    std::vector<bool> sparse(n, false);
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
        tensors, {static_cast<size_t>(first_bucket_bytes), static_cast<size_t>(bucket_bytes)},
        sparse);
    *out = new c10d::Reducer(tensors, buckets, static_cast<Group *>(group)->group, sparse,
                             bucket_bytes, /*find_unused_parameters=*/false,
                             /*gradient_as_bucket_view=*/false, {}, first_bucket_bytes,
                             /*skip_all_reduce_unused_params=*/false,
                             /*use_python_reducer=*/false,
                             std::vector<int64_t>(limits.begin(), limits.end()));
  })
}

// Arms the reducer for the next backward pass; every rank calls it at the same point. After the
// first step it also reorders the buckets by the order in which gradients became ready.
char *ddpm_reducer_arm(void *reducer) {
  DDPM_TRY({
    auto r = static_cast<c10d::Reducer *>(reducer);
    r->rebuild_buckets();
    r->prepare_for_backward({});
  })
}

// The Reducer's destructor may throw (it is noexcept(false)); nothing can be done about it here.
void ddpm_reducer_free(void *reducer) {
  try {
    delete static_cast<c10d::Reducer *>(reducer);
  } catch (...) {
  }
}

} // extern "C"
