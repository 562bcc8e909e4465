// The scaled matmul on the GPU: out[m, n] = a_scale[m] * b_scale[n] * sum_k a[m, k] b[k, n]
// (+ residual[m, n]), a and b both float8_e4m3fn or both int8, on one of two routes:
//
//   small-M (gemm/small_m.cuh): our kernel, for decode's few tokens (M <= kSmallMRows), for N not
//         a multiple of 16, and wherever cuBLASLt is missing or too old: per-channel scales only.
//   cuBLASLt: everything else, and the blockwise scales.
//
// The rule reads only (M, N, the dtype, the scales' kind) and the process's cuBLASLt, so a shape runs the same
// kernel, and gives the same bits, on every call; the `route` attribute forces one (tests and
// benchmarks).
//
// On cuBLASLt: it sees column-major matrices. Our row-major out [M, N] is its D [N, M] = op(A) [N, K] x
// op(B) [K, M], with A = b transposed (the primitive asks XLA for b in column-major layout, i.e.
// stored as [N][K]) and B = a as stored ([M][K]): the "TN" layout, the one cuBLASLt's FP8 and int8
// kernels take. So cuBLASLt's A scale (one per row of op(A)) is our b_scale, its B scale our a_scale.
//
//   fp8:  f32 accumulation, both scales applied in cuBLASLt's epilogue (outer-vector scale modes),
//         the residual as its C (beta = 1), rounded once to the output dtype.
//   fp8, blockwise (DeepSeek-V3's recipe): a_scale one per 1 x 128 group of a row, b_scale one per
//         128 x 128 block, applied by cuBLASLt inside the K loop (VEC128 / BLK128x128 modes). It
//         reads a_scale as [K / 128][M] (the primitive asks XLA for that layout) and b_scale as
//         [N / 128][K / 128 rounded up to 4] (padded here, in the workspace's tail, when needed);
//         the rows of a must be a multiple of 4 (the primitive pads them).
//   int8: int32 accumulation into a scratch result, then one pass here that applies the scales
//         (cuBLASLt's int8 kernels have no per-row x per-column epilogue) as contract/matmul.h's
//         scaled_output, the jnp reference's steps.
//
// The cuBLASLt plan (descriptors, layouts and the heuristic's algorithm) is made once per shape and
// device; the handler enqueues on XLA's stream and allocates nothing (the workspace and the int32
// accumulator are results XLA allocates), so a command buffer can capture it.
#include "gemm/scaled_matmul.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "contract/matmul.h"
#include "cuda/device.h"
#include "ffi/dispatch.h"
#include "gemm/cublaslt_api.h"
#include "gemm/small_m.cuh"
#include "xla/ffi/api/ffi.h"

namespace baracuda {
namespace {

ffi::Error lt_error(const char* op, const char* call, lt::Status status) {
  return internal(op, std::string(call) + " failed with cuBLAS status " + std::to_string(status));
}

// Returns the error of a cuBLASLt call (`api.call`) that fails; `op` names the op in it.
#define BJ_LT(call)                                                                             \
  do {                                                                                          \
    if (lt::Status bj_status = api.call; bj_status != 0) return lt_error(op, #call, bj_status); \
  } while (false)

struct Scales {
  const float* a;  // [M], or blockwise [K / 128][M]
  const float* b;  // [N], or blockwise [N / 128][round_up(K / 128, 4)]
};

constexpr int64_t kBlock = 128;
constexpr int64_t kBlockScaleAlign = 4;  // the scales' leading dimensions: 16-byte aligned

// ---- the int8 rescale --------------------------------------------------------------------------

template <class Out>
struct alignas(4 * sizeof(Out)) Out4 {
  Out v[4];
};

// Four columns a thread (the primitive routes only N % 16 == 0 here), as scaled_output.
template <class Out>
__global__ void rescale_kernel(const int4* __restrict__ acc, const float* __restrict__ a_scale,
                               const float4* __restrict__ b_scale, const Out4<Out>* __restrict__ residual,
                               Out4<Out>* __restrict__ out, int64_t rows, int64_t vecs_per_row) {
  const int64_t total = rows * vecs_per_row;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / vecs_per_row;
    const int a[4] = {acc[i].x, acc[i].y, acc[i].z, acc[i].w};
    const float4 b4 = b_scale[i - row * vecs_per_row];
    const float b[4] = {b4.x, b4.y, b4.z, b4.w}, s = a_scale[row];
    Out4<Out> r{}, o;
    if (residual != nullptr) r = residual[i];
#pragma unroll
    for (int j = 0; j < 4; ++j) o.v[j] = scaled_output<Out>(a[j], s, b[j], residual != nullptr ? &r.v[j] : nullptr);
    out[i] = o;
  }
}

template <class Out>
ffi::Error rescale(GemmExec exec, const int32_t* acc, Scales scales, const void* residual, void* out, int64_t m,
                   int64_t n) {
  DeviceAttributes device;
  current_device(device);  // where it fails, sms = 0: a grid of 8 blocks
  const int64_t vecs = m * (n / 4);
  const int threads = 256;
  const int blocks =
      static_cast<int>(std::min<int64_t>((vecs + threads - 1) / threads, int64_t{std::max(device.sms, 1)} * 8));
  rescale_kernel<Out><<<std::max(blocks, 1), threads, 0, exec.stream>>>(
      reinterpret_cast<const int4*>(acc), scales.a, reinterpret_cast<const float4*>(scales.b),
      static_cast<const Out4<Out>*>(residual), static_cast<Out4<Out>*>(out), m, n / 4);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    return internal(exec.op, std::string("rescale launch failed: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// ---- the blockwise b_scale's padding ----------------------------------------------------------

// dst [cols][rows_padded] <- src [cols][rows], zeros below. A kernel, not a 2-D memcpy: XLA updates
// a command buffer's nodes in place when its buffers move, which CUDA allows for kernels but not
// for 2-D copies.
__global__ void pad_columns_kernel(const float* __restrict__ src, float* __restrict__ dst, int64_t rows,
                                   int64_t rows_padded, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t col = i / rows_padded, row = i - col * rows_padded;
    dst[i] = row < rows ? src[col * rows + row] : 0.0f;
  }
}

ffi::Error pad_columns(GemmExec exec, const float* src, float* dst, int64_t rows, int64_t rows_padded, int64_t cols) {
  const int64_t total = rows_padded * cols;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 1024));
  pad_columns_kernel<<<std::max(blocks, 1), 256, 0, exec.stream>>>(src, dst, rows, rows_padded, total);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    return internal(exec.op, std::string("padding b_scale: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// ---- the cuBLASLt plans ------------------------------------------------------------------------

cudaDataType_t cuda_type(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F8E4M3FN: return CUDA_R_8F_E4M3;
    case ffi::DataType::S8: return CUDA_R_8I;
    case ffi::DataType::S32: return CUDA_R_32I;
    case ffi::DataType::BF16: return CUDA_R_16BF;
    case ffi::DataType::F16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

struct Plan {
  lt::MatmulDesc desc = nullptr;
  lt::MatrixLayout a = nullptr, b = nullptr, d = nullptr;
  std::vector<lt::HeuristicResult> candidates;  // the heuristic's, best guess first
  size_t chosen = 0;
  bool timed = false;
  std::mutex mu;  // the scale pointers are set on the shared descriptor just before each launch

  ~Plan() {
    if (const lt::Api* api = lt::api()) {
      for (lt::MatrixLayout l : {a, b, d})
        if (l) api->layout_destroy(l);
      if (desc) api->desc_destroy(desc);
    }
  }
};

// int8 only: the candidates' int32 sums are exact, so the choice cannot change a bit of the
// result, and the heuristic's first guess is up to 2x slower than the best at some shapes (M = 256).
// float8 keeps the heuristic's choice, whose summation order is fixed for a given GPU and cuBLASLt.
// Nor are decode shapes timed (M <= 64): bound by reading the weight, which the timing's repeated
// runs find in L2, they would favour a kernel that is slower on a cold weight.
constexpr int kInt8Candidates = 8;
constexpr int64_t kTimedRows = 65;

// (device, M, N, K, input dtype, accumulator-or-output dtype, workspace bytes, blockwise scales)
using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, size_t, bool>;

// cuBLASLt's A scale is one per row of op(A), our N: b_scale; its B scale is a_scale.
ffi::Error set_scales(const char* op, const lt::Api& api, lt::MatmulDesc desc, Scales scales) {
  const void* a_side = scales.b;
  const void* b_side = scales.a;
  BJ_LT(desc_set(desc, lt::kDescAScalePointer, &a_side, sizeof a_side));
  BJ_LT(desc_set(desc, lt::kDescBScalePointer, &b_side, sizeof b_side));
  return ffi::Error::Success();
}

ffi::Error make_plan(const char* op, const lt::Api& api, lt::Handle handle, const PlanKey& key, Scales scales,
                     Plan& plan) {
  const auto [dev, m, n, k, in, out, workspace, blockwise] = key;
  const bool fp8 = static_cast<ffi::DataType>(in) == ffi::DataType::F8E4M3FN;
  const cudaDataType_t in_type = cuda_type(static_cast<ffi::DataType>(in));
  const cudaDataType_t d_type = cuda_type(static_cast<ffi::DataType>(out));
  BJ_LT(desc_create(&plan.desc, fp8 ? lt::kCompute32F : lt::kCompute32I, fp8 ? CUDA_R_32F : CUDA_R_32I));
  const int32_t trans_a = lt::kOpT, trans_b = lt::kOpN;
  BJ_LT(desc_set(plan.desc, lt::kDescTransA, &trans_a, sizeof trans_a));
  BJ_LT(desc_set(plan.desc, lt::kDescTransB, &trans_b, sizeof trans_b));
  if (fp8) {
    // cuBLASLt's A is our b (128 x 128 blocks when blockwise), its B our a (1 x 128 groups)
    const int32_t a_mode = blockwise ? lt::kScaleBlk128x128_32F : lt::kScaleOuterVec32F;
    const int32_t b_mode = blockwise ? lt::kScaleVec128_32F : lt::kScaleOuterVec32F;
    BJ_LT(desc_set(plan.desc, lt::kDescAScaleMode, &a_mode, sizeof a_mode));
    BJ_LT(desc_set(plan.desc, lt::kDescBScaleMode, &b_mode, sizeof b_mode));
    BJ_TRY(set_scales(op, api, plan.desc, scales));  // the heuristic refuses these modes without them
  }
  BJ_LT(layout_create(&plan.a, in_type, k, n, k));  // b, stored [N][K]
  BJ_LT(layout_create(&plan.b, in_type, k, m, k));  // a, stored [M][K]
  BJ_LT(layout_create(&plan.d, d_type, n, m, n));   // out (or the int32 accumulator), [M][N]
  lt::Preference pref = nullptr;
  BJ_LT(preference_create(&pref));
  const uint64_t max_workspace = workspace;
  lt::Status status = api.preference_set(pref, lt::kPrefMaxWorkspaceBytes, &max_workspace, sizeof max_workspace);
  plan.candidates.resize(fp8 || m < kTimedRows ? 1 : kInt8Candidates);
  int found = 0;
  if (status == 0)
    status = api.heuristic(handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref,
                           static_cast<int>(plan.candidates.size()), plan.candidates.data(), &found);
  api.preference_destroy(pref);
  if (status != 0) return lt_error(op, "cublasLtMatmulAlgoGetHeuristic", status);
  if (found == 0)
    return internal(op, "cuBLASLt has no algorithm for M=" + std::to_string(m) + ", N=" + std::to_string(n) +
                            ", K=" + std::to_string(k));
  plan.candidates.resize(found);
  return ffi::Error::Success();
}

// Times each candidate on this call's buffers (once per plan; not while the stream is being
// captured into a command buffer, which cannot wait for events) and keeps the fastest.
template <class Launch>
void time_candidates(Plan& plan, cudaStream_t stream, Launch&& launch) {
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (plan.timed || plan.candidates.size() < 2 || cudaStreamIsCapturing(stream, &capturing) != cudaSuccess ||
      capturing != cudaStreamCaptureStatusNone)
    return;
  cudaEvent_t start, stop;
  if (cudaEventCreate(&start) != cudaSuccess) return;
  if (cudaEventCreate(&stop) != cudaSuccess) return (void)cudaEventDestroy(start);
  float best = INFINITY;
  for (size_t i = 0; i < plan.candidates.size(); ++i) {
    if (launch(plan.candidates[i]) != 0) continue;  // warm-up; a candidate that fails is skipped
    cudaEventRecord(start, stream);
    for (int r = 0; r < 3; ++r) launch(plan.candidates[i]);
    cudaEventRecord(stop, stream);
    float ms = INFINITY;
    if (cudaEventSynchronize(stop) == cudaSuccess && cudaEventElapsedTime(&ms, start, stop) == cudaSuccess &&
        ms < best) {
      best = ms;
      plan.chosen = i;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaGetLastError();
  plan.timed = true;
}

// One cuBLASLt handle per device, and the plans, for the life of the process.
struct Plans {
  std::mutex mu;
  std::map<int, lt::Handle> handles;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;

  ffi::Error get(const char* op, const lt::Api& api, const PlanKey& key, Scales scales, Plan*& plan,
                 lt::Handle& handle) {
    std::lock_guard<std::mutex> lock(mu);
    const int dev = std::get<0>(key);
    if (!handles.count(dev)) {
      lt::Handle h = nullptr;
      BJ_LT(create(&h));
      handles[dev] = h;
    }
    handle = handles[dev];
    auto& slot = plans[key];
    if (!slot) {
      auto fresh = std::make_unique<Plan>();
      if (ffi::Error err = make_plan(op, api, handle, key, scales, *fresh); !err.success()) {
        plans.erase(key);
        const auto [dev, m, n, k, in, out, workspace, blockwise] = key;
        return ffi::Error(*err.errc(), err.message() + " (M=" + std::to_string(m) + ", N=" + std::to_string(n) +
                                           ", K=" + std::to_string(k) + ", dtypes " + std::to_string(in) + " -> " +
                                           std::to_string(out) + ")");
      }
      slot = std::move(fresh);
    }
    plan = slot.get();
    return ffi::Error::Success();
  }
};

Plans& plans() {
  static Plans* p = new Plans();  // never destroyed: the library may be gone at exit
  return *p;
}

// ---- the small-M route ------------------------------------------------------------------------

// Decode's token counts, up to which the small-M kernel runs: on an H200 (benchmarks/decode.py) it
// beats cuBLASLt's route at every Llama-3 projection up to 16 tokens and loses at most of them by 32,
// for int8 and float8 alike.
constexpr int64_t kSmallMRows = 16;

// A call's operands, checked.
struct Operands {
  int64_t m, n, k;
  bool fp8, blockwise;
  ffi::DataType out_type;
  const void* residual;  // or null
};

ffi::Error check_operands(const char* op, ffi::AnyBuffer a, ffi::AnyBuffer a_scale, ffi::AnyBuffer b,
                          ffi::AnyBuffer b_scale, ffi::RemainingArgs residual_arg, ffi::AnyBuffer out, Operands& o) {
  const ffi::DataType in = a.element_type();
  o.fp8 = in == ffi::DataType::F8E4M3FN;
  if (!o.fp8 && in != ffi::DataType::S8) return invalid(op, "a must be float8_e4m3fn or int8");
  if (b.element_type() != in) return invalid(op, "b must have a's dtype");
  if (a_scale.element_type() != ffi::DataType::F32 || b_scale.element_type() != ffi::DataType::F32)
    return invalid(op, "a_scale and b_scale must be float32");
  const auto a_dims = a.dimensions(), b_dims = b.dimensions(), out_dims = out.dimensions();
  if (a_dims.size() < 1 || b_dims.size() != 2) return invalid(op, "a must be [..., K] and b [K, N]");
  const int64_t k = a_dims.back(), n = b_dims[1];
  const int64_t m = static_cast<int64_t>(a.element_count()) / std::max<int64_t>(k, 1);
  if (b_dims[0] != k) return invalid(op, "b must be [K, N] with a's K = " + std::to_string(k));
  if (k == 0 || k % 16 != 0)  // 16-byte rows for both routes
    return invalid(op, "K must be a positive multiple of 16 (the primitive lowers other shapes to XLA's dot)");
  o.blockwise = b_scale.dimensions().size() == 2;
  const int64_t kb = k / kBlock;
  if (o.blockwise) {
    if (!o.fp8 || k % kBlock != 0 || n % kBlock != 0 || m % kBlockScaleAlign != 0)  // cuBLASLt has no others
      return invalid(op,
                     "blockwise scales take float8_e4m3fn with K and N multiples of 128 and rows a multiple of 4 "
                     "(the primitive pads the rows)");
    if (static_cast<int64_t>(a_scale.element_count()) != m * kb || b_scale.dimensions()[0] != kb ||
        b_scale.dimensions()[1] != n / kBlock)
      return invalid(op, "blockwise scales must be a_scale [..., K / 128] and b_scale [K / 128, N / 128]");
  } else if (static_cast<int64_t>(a_scale.element_count()) != m || static_cast<int64_t>(b_scale.element_count()) != n) {
    return invalid(op, "a_scale must have one value per row of a and b_scale one per column of b");
  }
  o.out_type = out.element_type();
  if (o.out_type != ffi::DataType::BF16 && o.out_type != ffi::DataType::F16 && o.out_type != ffi::DataType::F32)
    return invalid(op, "out must be bfloat16, float16 or float32");
  if (out_dims.size() != a_dims.size() || out_dims.back() != n || static_cast<int64_t>(out.element_count()) != m * n)
    return invalid(op, "out must be [..., N]");
  o.residual = nullptr;
  if (residual_arg.size() > 0) {
    std::optional<ffi::AnyBuffer> r;
    BJ_TRY(remaining(residual_arg, 0, r));
    if (r->element_type() != o.out_type || r->element_count() != out.element_count())
      return invalid(op, "residual must be [..., N] in the output's dtype");
    o.residual = r->untyped_data();
  }
  o.m = m, o.n = n, o.k = k;
  return ffi::Error::Success();
}

template <class Mma>
ffi::Error small_m_launch(GemmExec exec, const small_m::Problem& p, ffi::DataType out, small_m::Device device,
                          bool chained) {
  cudaError_t err;
  switch (out) {
    case ffi::DataType::BF16: err = small_m::launch<Mma, bf16>(p, device, chained, exec.stream); break;
    case ffi::DataType::F16: err = small_m::launch<Mma, f16>(p, device, chained, exec.stream); break;
    default: err = small_m::launch<Mma, float>(p, device, chained, exec.stream); break;
  }
  if (err != cudaSuccess)
    return internal(exec.op, std::string("the small-M kernel's launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// The product on the small-M kernel; `chained`: as the dependent of the kernel enqueued before it.
ffi::Error small_m_product(GemmExec exec, const Operands& o, ffi::AnyBuffer a, ffi::AnyBuffer a_scale, ffi::AnyBuffer b,
                           ffi::AnyBuffer b_scale, ffi::AnyBuffer out, bool chained) {
  if (o.blockwise) return invalid(exec.op, "the small-M kernel takes per-channel scales (blockwise runs on cuBLASLt)");
  DeviceAttributes device;
  if (!current_device(device)) return internal(exec.op, "cannot query the current device");
  if (device.major < 8) return invalid(exec.op, "the small-M kernel needs sm_80 or newer");
  const small_m::Problem p{a.untyped_data(),
                           data_of<const float>(a_scale),
                           b.untyped_data(),
                           data_of<const float>(b_scale),
                           o.residual,
                           out.untyped_data(),
                           o.m,
                           o.n,
                           o.k,
                           1};
  const small_m::Device d{device.sms, device.major >= 9};
  return o.fp8 ? small_m_launch<small_m::E4M3Mma>(exec, p, o.out_type, d, chained)
               : small_m_launch<small_m::Int8Mma>(exec, p, o.out_type, d, chained);
}

}  // namespace

// ---- the handlers ------------------------------------------------------------------------------

ffi::Error chained_small_m(GemmExec exec, ffi::AnyBuffer a, ffi::AnyBuffer a_scale, ffi::AnyBuffer b,
                           ffi::AnyBuffer b_scale, ffi::RemainingArgs residual, ffi::AnyBuffer out) {
  Operands o;
  BJ_TRY(check_operands(exec.op, a, a_scale, b, b_scale, residual, out, o));
  if (o.m == 0 || o.n == 0) return ffi::Error::Success();
  return small_m_product(exec, o, a, a_scale, b, b_scale, out, true);
}

ffi::Error scaled_matmul(GemmExec exec, ffi::AnyBuffer a, ffi::AnyBuffer a_scale, ffi::AnyBuffer b,
                         ffi::AnyBuffer b_scale, ffi::RemainingArgs residual_arg, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::AnyBuffer> workspace, ffi::RemainingRets rest, std::string_view route) {
  const char* op = exec.op;
  Operands o;
  BJ_TRY(check_operands(op, a, a_scale, b, b_scale, residual_arg, *out, o));
  const int64_t m = o.m, n = o.n, k = o.k;
  const bool fp8 = o.fp8, blockwise = o.blockwise;
  const ffi::DataType out_type = o.out_type;
  const void* residual = o.residual;
  const ffi::DataType in = a.element_type();
  const int64_t kb = k / kBlock, kb_padded = (kb + kBlockScaleAlign - 1) / kBlockScaleAlign * kBlockScaleAlign;

  const lt::Api* loaded = lt::api();
  const bool lt_ready = loaded != nullptr && (!fp8 || loaded->version >= lt::kOuterVectorVersion);
  bool small;
  if (route == "auto")
    small = !blockwise && (m <= kSmallMRows || n % 16 != 0 || !lt_ready);
  else if (route == "small_m" || route == "cublaslt")
    small = route == "small_m";
  else
    return invalid(op, "route must be auto, cublaslt or small_m");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (small) return small_m_product(exec, o, a, a_scale, b, b_scale, *out, false);

  if (loaded == nullptr) return internal(op, "cuBLASLt is not loaded");
  const lt::Api& api = *loaded;
  if (!lt_ready)
    return invalid(
        op, "float8 needs cuBLASLt >= 12.9 (per-row and per-column scales); found " + std::to_string(api.version));
  if (n % 16 != 0) return invalid(op, "cuBLASLt needs N a multiple of 16 (the small-M route takes any N)");
  void* d = out->untyped_data();  // cuBLASLt's output: out, or for int8 the int32 accumulator
  if (!fp8) {
    std::optional<ffi::AnyBuffer> acc;
    BJ_TRY(remaining(rest, 0, acc));
    if (acc->element_type() != ffi::DataType::S32 || static_cast<int64_t>(acc->element_count()) != m * n)
      return invalid(op, "int8 needs an int32 [M, N] accumulator result");
    d = acc->untyped_data();
  }

  int dev = 0;
  if (cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return internal(op, cudaGetErrorString(err));
  Scales scales{data_of<const float>(a_scale), data_of<const float>(b_scale)};
  size_t workspace_bytes = workspace->size_bytes();
  if (blockwise && kb_padded != kb) {  // b_scale's columns padded to kb_padded rows, at the workspace's end
    const size_t bytes = static_cast<size_t>(kb_padded * (n / kBlock)) * sizeof(float);
    if (bytes + 256 > workspace_bytes) return invalid(op, "the workspace is too small for the padded b_scale");
    workspace_bytes = (workspace_bytes - bytes) / 256 * 256;
    float* padded = reinterpret_cast<float*>(static_cast<char*>(workspace->untyped_data()) + workspace_bytes);
    BJ_TRY(pad_columns(exec, scales.b, padded, kb, kb_padded, n / kBlock));
    scales.b = padded;
  }
  const PlanKey key{
      dev,      m, n, k, static_cast<int>(in), static_cast<int>(fp8 ? out_type : ffi::DataType::S32), workspace_bytes,
      blockwise};
  Plan* plan = nullptr;
  lt::Handle handle = nullptr;
  BJ_TRY(plans().get(op, api, key, scales, plan, handle));

  const float one_f = 1.0f, zero_f = 0.0f;
  const int32_t one_i = 1, zero_i = 0;
  const void* alpha = fp8 ? static_cast<const void*>(&one_f) : &one_i;
  // fp8: the residual is cuBLASLt's C (D = alpha * scales * AB + beta * C); int8 adds it when rescaling
  const bool add_c = fp8 && residual != nullptr;
  const void* beta = add_c ? static_cast<const void*>(&one_f) : fp8 ? static_cast<const void*>(&zero_f) : &zero_i;
  const void* c = add_c ? residual : d;
  {
    std::lock_guard<std::mutex> lock(plan->mu);
    if (fp8) BJ_TRY(set_scales(op, api, plan->desc, scales));
    const auto launch = [&](const lt::HeuristicResult& candidate) {
      return api.matmul(handle, plan->desc, alpha, b.untyped_data(), plan->a, a.untyped_data(), plan->b, beta, c,
                        plan->d, d, plan->d, &candidate.algo, workspace->untyped_data(), candidate.workspaceSize,
                        exec.stream);
    };
    time_candidates(*plan, exec.stream, launch);
    if (lt::Status status = launch(plan->candidates[plan->chosen]); status != 0)
      return lt_error(op, "cublasLtMatmul", status);
  }
  if (fp8) return ffi::Error::Success();
  const auto* acc = static_cast<const int32_t*>(d);
  switch (out_type) {
    case ffi::DataType::BF16: return rescale<bf16>(exec, acc, scales, residual, out->untyped_data(), m, n);
    case ffi::DataType::F16: return rescale<f16>(exec, acc, scales, residual, out->untyped_data(), m, n);
    default: return rescale<float>(exec, acc, scales, residual, out->untyped_data(), m, n);
  }
}

}  // namespace baracuda
