// Declarations for ProcessGroupGloo.hpp (see ../../README.md): held only behind pointers.
#pragma once

namespace gloo::transport {
class Device;
class UnboundBuffer;
} // namespace gloo::transport
