// CUDA graphs: the kernels of one piece of work recorded once and then launched together, which
// removes the host-side launch cost of the thousands of small kernels in a UNet forward+backward.
// Compiled where the build found the CUDA headers; elsewhere every entry point says so.
#include "binding.h"

#ifdef DDPM_WITH_CUDA
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace {

struct Graph {
  explicit Graph(c10::DeviceIndex device)
      : stream(c10::cuda::getStreamFromPool(false, device)) {}
  at::cuda::CUDAGraph graph;
  // Capture needs a stream other than the default one; warm-up runs on it too, so that lazily
  // made per-stream state (cuBLAS workspaces, cuDNN plans) exists before capture.
  c10::cuda::CUDAStream stream;
  // Held while work goes to `stream`. (The device-generic guard and event go through c10's
  // device interface, so that this file needs no CUDA runtime symbols of its own.)
  std::optional<c10::StreamGuard> guard;
  bool autocast_cache = true;
};

Graph *graph_of(void *handle) { return static_cast<Graph *>(handle); }

// `waiter` runs what is queued from now on only after the work queued so far on `stream`.
void order_after(const c10::Stream &stream, const c10::Stream &waiter) {
  c10::Event event(c10::DeviceType::CUDA);
  event.record(stream);
  event.block(waiter);
}

} // namespace

extern "C" {

char *ddpm_cuda_graph_new(int device, void **out) {
  DDPM_TRY({ *out = new Graph(static_cast<c10::DeviceIndex>(device)); })
}

void ddpm_cuda_graph_free(void *handle) { delete graph_of(handle); }

// Work goes to the graph's stream from now on, after what the current stream already holds.
char *ddpm_cuda_graph_enter(void *handle) {
  DDPM_TRY({
    auto *g = graph_of(handle);
    order_after(c10::cuda::getCurrentCUDAStream(g->stream.device_index()), g->stream);
    g->guard.emplace(g->stream);
  })
}

// Back to the previous stream, which first waits for the graph stream's work.
char *ddpm_cuda_graph_exit(void *handle) {
  DDPM_TRY({
    auto *g = graph_of(handle);
    g->guard.reset();
    order_after(g->stream, c10::cuda::getCurrentCUDAStream(g->stream.device_index()));
  })
}

// Starts recording (between enter and exit). Autocast's cast-weight cache is off meanwhile: a
// cached cast made during capture would be a tensor the graph's memory pool reclaims. The blocks
// the eager warm-up steps left cached are released first: the graph's private pool would
// otherwise come on top of them, and the run would hold about twice the memory of an eager one.
char *ddpm_cuda_graph_capture_begin(void *handle) {
  DDPM_TRY({
    auto *g = graph_of(handle);
    c10::cuda::CUDACachingAllocator::emptyCache();
    g->autocast_cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    try {
      // Thread-local: the data loader's threads may call into CUDA meanwhile.
      g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
      at::autocast::set_autocast_cache_enabled(g->autocast_cache);
      throw;
    }
  })
}

char *ddpm_cuda_graph_capture_end(void *handle) {
  auto *g = graph_of(handle);
  at::autocast::set_autocast_cache_enabled(g->autocast_cache);
  DDPM_TRY({ g->graph.capture_end(); })
}

// Runs the recorded kernels on the current stream, reading and writing the tensors they did.
char *ddpm_cuda_graph_replay(void *handle) { DDPM_TRY({ graph_of(handle)->graph.replay(); }) }

} // extern "C"

#else

namespace {
char *unavailable() {
  return ddpm::error_message("CUDA graphs are unavailable: this program was built without the "
                             "CUDA headers (tools/setup.sh installs them)");
}
} // namespace

extern "C" {
char *ddpm_cuda_graph_new(int, void **) { return unavailable(); }
void ddpm_cuda_graph_free(void *) {}
char *ddpm_cuda_graph_enter(void *) { return unavailable(); }
char *ddpm_cuda_graph_exit(void *) { return unavailable(); }
char *ddpm_cuda_graph_capture_begin(void *) { return unavailable(); }
char *ddpm_cuda_graph_capture_end(void *) { return unavailable(); }
char *ddpm_cuda_graph_replay(void *) { return unavailable(); }
} // extern "C"

#endif
