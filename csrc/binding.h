// What every C++ entry point shares: tensors cross the boundary as `at::Tensor*` (what tch's
// C_tensor points to), and each function returns nullptr on success or a malloc'd error message
// that the caller frees with ddpm_free_error.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace ddpm {

inline char *error_message(const char *what) { return strdup(what); }

inline std::vector<at::Tensor> list(at::Tensor **tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}

} // namespace ddpm

#define DDPM_TRY(...)                                                                              \
  try {                                                                                            \
    __VA_ARGS__;                                                                                   \
    return nullptr;                                                                                \
  } catch (const c10::Error &e) {                                                                  \
    return ddpm::error_message(e.what_without_backtrace());                                        \
  } catch (const std::exception &e) {                                                              \
    return ddpm::error_message(e.what());                                                          \
  }
