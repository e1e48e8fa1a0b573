// Activation checkpointing: a block's forward keeps only its inputs; backward runs the block
// again (same random state, same autocast) and differentiates that run. The block itself is
// Rust code, called back through a function pointer.
#include "binding.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <memory>
#include <stdexcept>
#include <string>

extern "C" {
// Computes the block's output from its arguments (heap tensors the callee takes over) into
// `*out` (a heap tensor the caller takes over); returns nullptr or a malloc'd error message.
typedef char *(*ddpm_block_call)(void *block, at::Tensor **args, size_t n, at::Tensor **out);
typedef void (*ddpm_block_drop)(void *block);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The Rust block; dropped with the autograd node that holds it.
struct Block {
  ddpm_block_call call;
  void *data;
  ddpm_block_drop drop;
  Block(const Block &) = delete;
  Block &operator=(const Block &) = delete;
  ~Block() { drop(data); }

  at::Tensor run(const std::vector<at::Tensor> &args) const {
    std::vector<at::Tensor *> owned;
    for (const auto &a : args) owned.push_back(new at::Tensor(a));
    at::Tensor *out = nullptr;
    char *error = call(data, owned.data(), owned.size(), &out);
    if (error) {
      std::string message(error);
      free(error);
      throw std::runtime_error("recomputed block: " + message);
    }
    at::Tensor result = *out;
    delete out;
    return result;
  }
};

// A tensor whose storage deleter owns the block: saved in the node's context, it lives
// exactly as long as the node.
at::Tensor owner_of(Block *block) {
  return at::from_blob(
      block, {1}, [](void *p) { delete static_cast<Block *>(p); },
      at::TensorOptions().dtype(at::kByte));
}

const at::DeviceType kAutocastDevices[] = {at::kCPU, at::kCUDA};

// Autocast as it was at the forward pass, put back for the recomputation.
struct AutocastScope {
  bool was_enabled[2];
  at::ScalarType was_dtype[2];

  AutocastScope(AutogradContext *ctx) {
    for (int i = 0; i < 2; ++i) {
      auto device = kAutocastDevices[i];
      was_enabled[i] = at::autocast::is_autocast_enabled(device);
      was_dtype[i] = at::autocast::get_autocast_dtype(device);
      auto key = std::to_string(i);
      at::autocast::set_autocast_enabled(device, ctx->saved_data["autocast" + key].toBool());
      at::autocast::set_autocast_dtype(
          device, static_cast<at::ScalarType>(ctx->saved_data["dtype" + key].toInt()));
    }
  }
  ~AutocastScope() {
    for (int i = 0; i < 2; ++i) {
      at::autocast::set_autocast_enabled(kAutocastDevices[i], was_enabled[i]);
      at::autocast::set_autocast_dtype(kAutocastDevices[i], was_dtype[i]);
    }
  }

  static void save(AutogradContext *ctx) {
    for (int i = 0; i < 2; ++i) {
      auto key = std::to_string(i);
      ctx->saved_data["autocast" + key] = at::autocast::is_autocast_enabled(kAutocastDevices[i]);
      ctx->saved_data["dtype" + key] =
          static_cast<int64_t>(at::autocast::get_autocast_dtype(kAutocastDevices[i]));
    }
  }
};

// The random state as it was at the forward pass, put back for the recomputation (so dropout
// draws the same masks) and restored after it.
struct RandomScope {
  at::Generator generator;
  at::Tensor was;

  RandomScope(AutogradContext *ctx, const at::Device &device)
      : generator(at::globalContext().defaultGenerator(device)) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    was = generator.get_state();
    generator.set_state(ctx->saved_data["random_state"].toTensor());
  }
  ~RandomScope() {
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(was);
  }

  static void save(AutogradContext *ctx, const at::Device &device) {
    auto generator = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(generator.mutex());
    ctx->saved_data["random_state"] = generator.get_state();
  }
};

// Inputs: the block's arguments (the first `n_args`), then its parameters.
struct Recomputed : public torch::autograd::Function<Recomputed> {
  // `inputs` is a TensorList: autograd treats a std::vector argument as a non-tensor.
  static at::Tensor forward(AutogradContext *ctx, Block *block, int64_t n_args, bool random,
                            at::TensorList inputs) {
    ctx->saved_data["block"] = owner_of(block);
    ctx->saved_data["n_args"] = n_args;
    ctx->saved_data["random"] = random;
    AutocastScope::save(ctx);
    if (random) RandomScope::save(ctx, inputs[0].device());
    ctx->save_for_backward(inputs.vec());
    std::vector<at::Tensor> args(inputs.begin(), inputs.begin() + n_args);
    return block->run(args);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto inputs = ctx->get_saved_variables();
    auto n_args = ctx->saved_data["n_args"].toInt();
    auto *block = static_cast<Block *>(ctx->saved_data["block"].toTensor().data_ptr());
    // The arguments as new leaves; the parameters as they are, so the run's graph reaches them.
    std::vector<at::Tensor> args, wrt;
    std::vector<bool> differentiable;
    for (int64_t i = 0; i < static_cast<int64_t>(inputs.size()); ++i) {
      auto input = inputs[i];
      differentiable.push_back(input.requires_grad());
      if (i < n_args) {
        input = input.detach().requires_grad_(input.requires_grad());
        args.push_back(input);
      }
      if (input.requires_grad()) wrt.push_back(input);
    }
    at::Tensor out;
    {
      AutocastScope autocast(ctx);
      std::unique_ptr<RandomScope> random;
      if (ctx->saved_data["random"].toBool())
        random = std::make_unique<RandomScope>(ctx, inputs[0].device());
      at::AutoGradMode grad_mode(true);
      out = block->run(args);
    }
    auto found = torch::autograd::grad({out}, wrt, {grads[0]}, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
    // One gradient per forward argument: none for the block, n_args and random.
    variable_list result = {at::Tensor(), at::Tensor(), at::Tensor()};
    size_t next = 0;
    for (bool d : differentiable) result.push_back(d ? found[next++] : at::Tensor());
    return result;
  }
};

} // namespace

extern "C" {

// Runs a block through `call` without keeping its activations for backward. `args` are its
// `n_args` tensor arguments, `params` the parameters it reads; with `random`, the recomputation
// replays the random state of the forward pass (dropout).
char *ddpm_recomputed(ddpm_block_call call, void *data, ddpm_block_drop drop, at::Tensor **args,
                      size_t n_args, at::Tensor **params, size_t n_params, int random,
                      at::Tensor **out) {
  // Built in place: a temporary Block would drop the Rust closure on destruction.
  std::unique_ptr<Block> block(new Block{call, data, drop});
  DDPM_TRY({
    auto inputs = ddpm::list(args, n_args);
    for (auto &p : ddpm::list(params, n_params)) inputs.push_back(p);
    *out = new at::Tensor(Recomputed::apply(block.release(), static_cast<int64_t>(n_args),
                                            random != 0, at::TensorList(inputs)));
  })
}

} // extern "C"
