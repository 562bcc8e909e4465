// The CPU module (_cpu): a handler symbol for each BJ_OP row of ffi/ops.def, which runs the row's
// body on the CPU engine, and registrations() of them all.
#include <nanobind/nanobind.h>

#include <stdexcept>
#include <utility>

#include "cpu/engine.h"
#include "ffi/fused.h"
#include "ffi/per_token.h"
#include "ffi/registrations.h"

using namespace baracuda;

// The output formats of contract/formats.h as (name, is_float, lowest, max): baracuda_jax/_formats.py
// is checked against them at import.
template <class... Fs>
nanobind::list format_table(TypeList<Fs...>) {
  nanobind::list table;
  (table.append(nanobind::make_tuple(Fs::kName, Fs::kFloat, Fs::kLowest, Fs::kMax)), ...);
  return table;
}

// The handler of a row of ffi/ops.def: the row's body on a CpuExec that holds the row's name and
// XLA's thread pool.
#define BJ_OP(name, body, bind)                                                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                                                 \
      baracuda_##name##_cpu,                                                                                     \
      [](ffi::ThreadPool pool, auto... operands) { return body(CpuExec(#name, pool), std::move(operands)...); }, \
      bind(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
#include "ffi/ops.def"

NB_MODULE(_cpu, m) {
#if defined(__x86_64__) || defined(_M_X64)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c"))
    throw std::runtime_error(
        "baracuda_jax: the CPU kernels are built for x86-64 with AVX2 and F16C, "
        "which this CPU lacks");
#endif
  m.def(
      "registrations",
      []() {
        return registrations({
#define BJ_OP(name, body, bind) {#name, baracuda_##name##_cpu},
#include "ffi/ops.def"
        });
      },
      "The CPU targets: 'baracuda_<name>' -> handler capsule, one per BJ_OP row of csrc/ffi/ops.def.");
  m.def(
      "formats", [] { return format_table(Formats{}); },
      "The output formats of csrc/contract/formats.h: (name, is_float, lowest, max) each.");
}
