// The registrations() dict of a backend module: "baracuda_<name>" -> handler capsule, one entry
// per row of ffi/ops.def that the module compiles. Both modules build it from the same table, so
// that one primitive lowers to the same custom call on either platform.
#pragma once

#include <initializer_list>
#include <string>
#include <utility>

#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace baracuda {

inline nanobind::dict registrations(std::initializer_list<std::pair<const char*, XLA_FFI_Handler*>> targets) {
  nanobind::dict d;
  for (const auto& [name, handler] : targets)
    d[(std::string("baracuda_") + name).c_str()] = nanobind::capsule(reinterpret_cast<void*>(handler));
  return d;
}

}  // namespace baracuda
