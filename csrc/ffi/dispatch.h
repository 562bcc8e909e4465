// What the handler bodies (ffi/per_token.h, ffi/fused.h, gemm/scaled_matmul.cu) share between the
// framework-free contract and XLA's FFI:
//   errors       invalid(op, what), internal(op, what), and BJ_TRY, the one way a check passes
//                its error up
//   dtypes       each data type's and format's FFI dtype and name (ffi_dtype_of, type_name)
//   dispatch     a call's data type and format, picked out of the sets an op accepts
//   checks       of buffers (Rows, check_rows, check_like, check_count, remaining) and of grids
//   functors     the contract's quantizers built from a call's attributes (make_op, ...)
//   binders      the pieces the ops' FFI signatures are written with (args, rets, ..._attrs)
// A body takes its backend's Exec first; exec.op is the op's name from its row of ffi/ops.def
// (the generated handler sets it), and every error message starts with "baracuda <op>: ".
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "contract/numerics.h"
#include "xla/ffi/api/ffi.h"

namespace baracuda {

namespace ffi = xla::ffi;

// ---- errors ---------------------------------------------------------------------------------

// Returns from the enclosing function with the ffi::Error `expr` when it is not a success.
#define BJ_TRY(expr)                                                  \
  do {                                                                \
    if (ffi::Error bj_err = (expr); !bj_err.success()) return bj_err; \
  } while (false)

inline ffi::Error invalid(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string("baracuda ") + op + ": " + what);
}
// A failure of the device or of a library, not of the call's arguments.
inline ffi::Error internal(const char* op, const std::string& what) {
  return ffi::Error::Internal(std::string("baracuda ") + op + ": " + what);
}

// ---- the FFI dtype and the name of each data type and format --------------------------------

template <class T> constexpr ffi::DataType ffi_dtype_of();
template <> constexpr ffi::DataType ffi_dtype_of<f16>() { return ffi::DataType::F16; }
template <> constexpr ffi::DataType ffi_dtype_of<bf16>() { return ffi::DataType::BF16; }
template <> constexpr ffi::DataType ffi_dtype_of<float>() { return ffi::DataType::F32; }
template <> constexpr ffi::DataType ffi_dtype_of<double>() { return ffi::DataType::F64; }
template <> constexpr ffi::DataType ffi_dtype_of<int32_t>() { return ffi::DataType::S32; }
template <> constexpr ffi::DataType ffi_dtype_of<Int8>() { return ffi::DataType::S8; }
template <> constexpr ffi::DataType ffi_dtype_of<UInt8>() { return ffi::DataType::U8; }
template <> constexpr ffi::DataType ffi_dtype_of<E4M3>() { return ffi::DataType::F8E4M3FN; }
template <> constexpr ffi::DataType ffi_dtype_of<E5M2>() { return ffi::DataType::F8E5M2; }

// numpy's names: a format's own kName, a data type's below.
template <class T> constexpr const char* type_name() { return T::kName; }
template <> constexpr const char* type_name<f16>() { return "float16"; }
template <> constexpr const char* type_name<bf16>() { return "bfloat16"; }
template <> constexpr const char* type_name<float>() { return "float32"; }
template <> constexpr const char* type_name<double>() { return "float64"; }
template <> constexpr const char* type_name<int32_t>() { return "int32"; }

// The name of the type in `Ts` whose dtype is t, or null.
template <class... Ts>
const char* name_in(TypeList<Ts...>, ffi::DataType t) {
  const char* name = nullptr;
  ((name == nullptr && ffi_dtype_of<Ts>() == t ? void(name = type_name<Ts>()) : void()), ...);
  return name;
}

inline std::string dtype_name(ffi::DataType t) {
  if (const char* name = name_in(TypeList<f16, bf16, float, double, int32_t>{}, t)) return name;
  if (const char* name = name_in(Formats{}, t)) return name;
  return "dtype #" + std::to_string(static_cast<int>(t));
}

// ---- dispatch: the sets of types an op accepts, and the call's types among them --------------

using Floats = TypeList<f16, bf16, float, double>;  // the per-token ops' data
using FusedFloats = TypeList<f16, bf16, float>;     // the fused ops' data (they compute in float32)

// The formats with a symmetric grid, the fused ops' (int8 and the float8 formats).
template <class F> constexpr bool kSymmetricGrid = F::kFloat || F::kLowest < 0;
template <class... A, class... B> constexpr auto operator+(TypeList<A...>, TypeList<B...>) {
  return TypeList<A..., B...>{};
}
template <class... Fs>
constexpr auto symmetric_formats(TypeList<Fs...>) {
  return (TypeList<>{} + ... + std::conditional_t<kSymmetricGrid<Fs>, TypeList<Fs>, TypeList<>>{});
}
using SymmetricFormats = decltype(symmetric_formats(Formats{}));

template <class T> struct Tag { using type = T; };

// What a dispatch picks a type of `Set` by: a buffer's dtype (`arg` names the buffer in errors),
// or the name a `format` attribute holds.
template <class Set> struct DtypeKey {
  const char* arg;
  ffi::DataType dtype;
};
template <class Set> struct NameKey { std::string_view name; };
template <class Set> DtypeKey<Set> dtype_of(const char* arg, ffi::AnyBuffer buffer) {
  return {arg, buffer.element_type()};
}
template <class Set> NameKey<Set> named(std::string_view name) { return {name}; }

template <class T, class = void> struct IsFormat : std::false_type {};
template <class T> struct IsFormat<T, std::void_t<typename T::grid>> : std::true_type {};

// What an error says was expected: "a, b or c" (data types), "one of a, b, c" (formats).
template <class T, class... Ts>
std::string expected(TypeList<T, Ts...>) {
  const char* names[] = {type_name<T>(), type_name<Ts>()...};
  constexpr size_t kCount = 1 + sizeof...(Ts);
  std::string list = IsFormat<T>::value ? "one of " : "";
  for (size_t i = 0; i < kCount; ++i)
    list += std::string(i == 0 ? "" : !IsFormat<T>::value && i + 1 == kCount ? " or " : ", ") + names[i];
  return list;
}

template <class... Ts, class Fn>
ffi::Error find(const char* op, DtypeKey<TypeList<Ts...>> key, Fn&& fn) {
  std::optional<ffi::Error> result;
  ((!result && ffi_dtype_of<Ts>() == key.dtype ? void(result.emplace(fn(Tag<Ts>{}))) : void()), ...);
  if (result) return std::move(*result);
  return invalid(
      op, std::string(key.arg) + " has dtype " + dtype_name(key.dtype) + "; expected " + expected(TypeList<Ts...>{}));
}

template <class... Ts, class Fn>
ffi::Error find(const char* op, NameKey<TypeList<Ts...>> key, Fn&& fn) {
  std::optional<ffi::Error> result;
  ((!result && key.name == type_name<Ts>() ? void(result.emplace(fn(Tag<Ts>{}))) : void()), ...);
  if (result) return std::move(*result);
  return invalid(op, "format is " + std::string(key.name) + "; expected " + expected(TypeList<Ts...>{}));
}

// The handler bodies' one dispatch: fn(Tag<A>{}, Tag<B>{}) for the type A that key `a` picks and
// the type B that key `b` picks (a data type and a format, in either order), each instantiated
// for every type of its set; or the error of the first key that picks none.
template <class KeyA, class KeyB, class Fn>
ffi::Error dispatch(const char* op, KeyA a, KeyB b, Fn&& fn) {
  return find(op, a, [&](auto ta) { return find(op, b, [&](auto tb) { return fn(ta, tb); }); });
}

// ---- buffer checks ---------------------------------------------------------------------------

// The row layout every op shares: data [..., D] folded into [N, D].
struct Rows { int64_t rows = 0, cols = 0; };

inline ffi::Error rows_of(const char* op, const char* arg, ffi::AnyBuffer data, Rows& s) {
  const auto dims = data.dimensions();
  if (dims.size() < 1) return invalid(op, std::string(arg) + " must have rank >= 1");
  s.cols = dims.back();
  s.rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) s.rows *= dims[i];
  return ffi::Error::Success();
}

inline ffi::Error check_same_dims(const char* op, const char* arg, ffi::AnyBuffer a, const char* ref_arg,
                                  ffi::AnyBuffer ref) {
  const auto da = a.dimensions(), dr = ref.dimensions();
  bool same = da.size() == dr.size();
  for (size_t i = 0; same && i < da.size(); ++i) same = da[i] == dr[i];
  if (!same) return invalid(op, std::string(arg) + " must have the shape of " + ref_arg);
  return ffi::Error::Success();
}

// `a` has the dtype and the shape of `ref`.
inline ffi::Error check_like(const char* op, const char* arg, ffi::AnyBuffer a, const char* ref_arg,
                             ffi::AnyBuffer ref) {
  if (a.element_type() != ref.element_type())
    return invalid(op, std::string(arg) + " has dtype " + dtype_name(a.element_type()) + "; expected " + ref_arg +
                           "'s, " + dtype_name(ref.element_type()));
  return check_same_dims(op, arg, a, ref_arg, ref);
}

// `a` holds `count` values of `dtype`.
inline ffi::Error check_count(const char* op, const char* arg, ffi::AnyBuffer a, ffi::DataType dtype, int64_t count,
                              const char* what) {
  if (a.element_type() != dtype || static_cast<int64_t>(a.element_count()) != count)
    return invalid(op, std::string(arg) + " must be " + dtype_name(dtype) + " with " + what + " (" +
                           std::to_string(count) + " values)");
  return ffi::Error::Success();
}

// The data, its output and a per-row scale in the math type M; fills `shape`.
template <class M>
ffi::Error check_rows(const char* op, ffi::AnyBuffer data, ffi::AnyBuffer out, ffi::AnyBuffer scale, Rows& shape) {
  BJ_TRY(rows_of(op, "the data operand", data, shape));
  BJ_TRY(check_same_dims(op, "the output", out, "the data operand", data));
  if (scale.element_type() != ffi_dtype_of<M>())
    return invalid(op, "scale has dtype " + dtype_name(scale.element_type()) + "; expected " +
                           dtype_name(ffi_dtype_of<M>()) + " (the math type)");
  if (static_cast<int64_t>(scale.element_count()) != shape.rows)
    return invalid(op, "scale has " + std::to_string(scale.element_count()) + " elements; expected one per row (" +
                           std::to_string(shape.rows) + ")");
  return ffi::Error::Success();
}

// The i-th of a call's remaining operands (or results), into `buffer`.
inline ffi::Error remaining(ffi::RemainingArgs rest, size_t i, std::optional<ffi::AnyBuffer>& buffer) {
  auto b = rest.get<ffi::AnyBuffer>(i);
  if (b.has_error()) return b.error();
  buffer.emplace(*b);
  return ffi::Error::Success();
}
inline ffi::Error remaining(ffi::RemainingRets rest, size_t i, std::optional<ffi::AnyBuffer>& buffer) {
  auto b = rest.get<ffi::AnyBuffer>(i);
  if (b.has_error()) return b.error();
  buffer.emplace(**b);
  return ffi::Error::Success();
}

// An empty list of remaining operands: a body calling another body passes none of its optional ones.
inline ffi::RemainingArgs no_operands() {
  static const XLA_FFI_Args none{XLA_FFI_Args_STRUCT_SIZE, nullptr, 0, nullptr, nullptr};
  return ffi::RemainingArgs(&none, 0);
}

template <class T> T* data_of(ffi::AnyBuffer b) { return static_cast<T*>(b.untyped_data()); }

// ---- grid checks -----------------------------------------------------------------------------

// A format's grid: an integer one inside the type's range, or the float8 one, [-fmax, fmax] with
// no zero point.
template <class F>
ffi::Error check_grid(const char* op, int32_t qmin, int32_t qmax, bool has_zp) {
  if constexpr (F::kFloat) {
    if (has_zp) return invalid(op, std::string(F::kName) + " takes no zero_point");
    if (qmin != -F::kMax || qmax != F::kMax)
      return invalid(op, std::string(F::kName) + " has the fixed grid qmin=" + std::to_string(-F::kMax) +
                             ", qmax=" + std::to_string(F::kMax) + "; got qmin=" + std::to_string(qmin) +
                             ", qmax=" + std::to_string(qmax));
  } else if (qmin > qmax || qmin < F::kLowest || qmax > F::kMax) {
    return invalid(op, "need " + std::to_string(F::kLowest) + " <= qmin <= qmax <= " + std::to_string(F::kMax) +
                           " for " + F::kName + ", got qmin=" + std::to_string(qmin) +
                           ", qmax=" + std::to_string(qmax));
  }
  return ffi::Error::Success();
}

// A dynamic op's grid: symmetric (scale_ub, min_scale and pow2_scale allowed) or with a zero point
// (integer formats only).
template <class F>
ffi::Error check_dynamic(const char* op, bool symmetric, int32_t qmin, int32_t qmax, double scale_ub, double min_scale,
                         bool pow2_scale = false) {
  if (!(scale_ub > 0)) return invalid(op, "scale_ub must be positive (+inf for none), got " + std::to_string(scale_ub));
  if (!(min_scale >= 0 && min_scale < std::numeric_limits<double>::infinity()))
    return invalid(op, "min_scale must be finite and >= 0 (0 for none), got " + std::to_string(min_scale));
  if (!symmetric && (scale_ub != std::numeric_limits<double>::infinity() || min_scale != 0 || pow2_scale))
    return invalid(op, "scale_ub, min_scale and pow2_scale apply to symmetric quantization only");
  if (qmin >= qmax) return invalid(op, "need qmin < qmax");
  return check_grid<F>(op, qmin, qmax, !symmetric);
}

// ---- the contract's quantizers, from a call's attributes ---------------------------------------

template <class Op, class M>
Op make_op(const M* scale, const int32_t* zp, int32_t qmin, int32_t qmax) {
  Op op;
  op.scale = scale;
  op.zero_point = zp;
  op.has_zp = zp != nullptr;
  op.qmin = M(qmin);
  op.qmax = M(qmax);
  return op;
}

template <class Op, class M>
Op make_dynamic_op(bool symmetric, int32_t qmin, int32_t qmax, double scale_ub, double min_scale,
                   bool pow2_scale = false) {
  Op op;
  op.scale = nullptr;
  op.zero_point = nullptr;
  op.has_zp = !symmetric;
  op.qmin = M(qmin);
  op.qmax = M(qmax);
  op.scale_ub = M(scale_ub);
  op.min_scale = M(min_scale);
  op.pow2_scale = pow2_scale;
  return op;
}

// ---- binders ---------------------------------------------------------------------------------
// `b` is ffi::Ffi::Bind() with the backend's context (the CUDA stream, the CPU thread pool)
// already bound. A binding cannot be copied, only moved and extended: each helper takes it by
// reference and returns the extended one.

template <int N, class B> auto args(B&& b) {
  if constexpr (N == 1)
    return std::move(b).template Arg<ffi::AnyBuffer>();
  else
    return args<N - 1>(std::move(b).template Arg<ffi::AnyBuffer>());
}
template <int N, class B> auto rets(B&& b) {
  if constexpr (N == 1)
    return std::move(b).template Ret<ffi::AnyBuffer>();
  else
    return rets<N - 1>(std::move(b).template Ret<ffi::AnyBuffer>());
}
template <class B> auto grid_attrs(B&& b) {
  return std::move(b).template Attr<int32_t>("qmin").template Attr<int32_t>("qmax");
}
template <class B> auto format_attrs(B&& b) {
  return grid_attrs(std::move(b).template Attr<std::string_view>("format"));
}

}  // namespace baracuda
