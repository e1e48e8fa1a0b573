// Declarations for ProcessGroupGloo.hpp (see ../README.md). The header's inline setTimeout calls
// Context::setTimeout, so the class is declared with that member; it is defined in libtorch.
#pragma once
#include <chrono>

namespace gloo {
class Context {
public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
