// The CUDA engine: CudaExec, the launch policies that run each row-engine call of ffi/per_token.h
// and ffi/fused.h on the kernels of cuda/*.cuh (the vector width, the vectors a thread, the threads
// and blocks of a launch); and the handler symbols of every row of ffi/ops.def, the CUDA-only ones
// included, each of which counts its calls and hands its body the op's name.
#include "cuda/engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>

#include "cuda/device.h"
#include "cuda/dynamic.cuh"
#include "cuda/norm.cuh"
#include "cuda/reduce.cuh"
#include "cuda/row_map.cuh"
#include "cuda/transpose.cuh"
#include "cuda/vec.cuh"
#include "ffi/dispatch.h"
#include "ffi/fused.h"
#include "ffi/per_token.h"
#include "ffi/w8a8.h"
#include "gemm/scaled_matmul.h"

namespace baracuda {
namespace {

// Each call of a CUDA handler, counted on the host: a command buffer replays the kernels without
// calling the handler, which is how the tests see that XLA captured the custom call.
std::atomic<int64_t> handler_calls{0};

struct CudaExec {
  const char* op;  // the op's name, for errors
  cudaStream_t stream;
  CudaExec(const char* op, cudaStream_t stream) : op(op), stream(stream) {}
  operator GemmExec() const { return {op, stream}; }  // NOLINT: the matmuls' bodies take this

  template <int W, class Op, class OutPtr, class... In>
  ffi::Error launch(const Op& op, int64_t rows, int64_t cols, OutPtr out, const In*... in) const {
    // Ops of three inputs (the SiLU backward) keep two vectors of each in flight, not four: their
    // registers would otherwise limit the threads per SM.
    constexpr int U = sizeof...(In) >= 3 ? 2 : kUnroll;
    const int64_t nvec = cols / W;  // the most whole vectors any row holds
    const int per_thread = vectors_per_thread(rows * nvec, U);
    const int64_t chunk = int64_t{kThreads} * per_thread;
    const int64_t chunks = std::max<int64_t>(1, (nvec + chunk - 1) / chunk);
    const int64_t tiles = rows * chunks;
    const int grid = static_cast<int>(std::min<int64_t>(tiles, int64_t{1} << 20));
    // One vector a thread gets its own kernel, 40 % of the four-vector one's instructions:
    // small shapes are bound by the length of each thread's instruction stream.
    const auto kernel =
        per_thread == 1 ? row_map_kernel<W, 1, Op, OutPtr, In...> : row_map_kernel<W, U, Op, OutPtr, In...>;
    kernel<<<grid, kThreads, 0, stream>>>(op, cols, chunks, tiles, per_thread, out, in...);
    return launch_error();
  }

  template <class Op, class OutPtr, class... In>
  ffi::Error map_rows(const Op& op, int64_t rows, int64_t cols, OutPtr out, const In*... in) const {
    if (rows == 0 || cols == 0) return ffi::Error::Success();
    constexpr int W = vec_width<typename OutElem<OutPtr>::type, In...>();
    // XLA's buffers are aligned; the scalar kernel covers any that are not.
    if (vector_aligned<W>(out, in...)) return launch<W>(op, rows, cols, out, in...);
    return launch<1>(op, rows, cols, out, in...);
  }

  template <int W, class Op, class Out, class M, class... In>
  ffi::Error launch_dynamic(const Op& op, int64_t rows, int64_t cols, Out* out, M* scale, int32_t* zp,
                            const In*... in) const {
    // Up to eight vectors a thread (four with a producer of several inputs, whose loads are all
    // in flight together): fewer threads per row leave room for more rows per SM, whose loads
    // overlap the others' reductions; rows past kMaxThreads * C vectors stream.
    constexpr int C = kCache / (sizeof...(In) > 1 ? 2 : 1);
    const int64_t nvec = cols / W;
    const int per_thread = vectors_per_thread(rows * nvec, C);
    if (cols % W == 0 && nvec >= 1 && nvec <= 32 && (nvec & (nvec - 1)) == 0) {  // short rows of whole vectors
      const int lanes = static_cast<int>(nvec), rows_per_pass = kShortRowThreads / lanes * per_thread;
      const int grid = static_cast<int>(std::min<int64_t>((rows + rows_per_pass - 1) / rows_per_pass, 1 << 20));
      short_row_kernel<W, C>
          <<<grid, kShortRowThreads, 0, stream>>>(op, rows, cols, lanes, per_thread, out, scale, zp, in...);
      return launch_error();
    }
    // Few rows (decode): two vectors a lane, in the kernel compiled for two. A row's time is then a
    // chain of dependent steps, and on an H200 half the lanes (a shorter block reduction) and a
    // quarter of the unrolled code took 3.5 -> 2.6 us off a row of 4096 (a range is a max: the
    // lanes a row take change no bit).
    const bool few_rows = per_thread <= kDecodeVectors && nvec <= int64_t{kDecodeVectors} * kMaxThreads;
    const int vectors = few_rows ? kDecodeVectors : per_thread;
    const int64_t wanted = std::max<int64_t>(1, (nvec + vectors - 1) / vectors);
    int lanes = row_threads(nvec, vectors), threads = lanes;
    if (wanted <= 32) {  // a short row: a power of two of lanes, many rows a block
      lanes = 1;
      while (lanes < wanted) lanes *= 2;
      threads = kShortRowThreads;
    }
    const int64_t blocks = (rows + threads / lanes - 1) / (threads / lanes);
    const int grid = static_cast<int>(std::min<int64_t>(blocks, int64_t{1} << 20));
    const auto kernel = few_rows ? dynamic_row_kernel<W, kDecodeVectors, Op, Out, M, In...>
                                 : dynamic_row_kernel<W, C, Op, Out, M, In...>;
    kernel<<<grid, threads, 0, stream>>>(op, rows, cols, lanes, out, scale, zp, in...);
    return launch_error();
  }

  template <class Op, class Out, class M, class... In>
  ffi::Error dynamic_rows(const Op& op, int64_t rows, int64_t cols, Out* out, M* scale, int32_t* zp,
                          const In*... in) const {
    if (rows == 0) return ffi::Error::Success();
    constexpr int W = vec_width<Out, In...>();
    if (vector_aligned<W>(out, in...)) return launch_dynamic<W>(op, rows, cols, out, scale, zp, in...);
    return launch_dynamic<1>(op, rows, cols, out, scale, zp, in...);
  }

  // The two passes of cuda/transpose.cuh, the scales' buffers holding the amax between them.
  template <class Op, class Q, class T>
  ffi::Error dynamic_rows_and_columns(const Op& quant, int64_t rows, int64_t cols, int64_t padded, Q* q, float* scale,
                                      Q* q_t, float* scale_t, const T* x) const {
    if (cudaMemsetAsync(scale, 0, rows * sizeof(float), stream) != cudaSuccess ||
        cudaMemsetAsync(scale_t, 0, cols * sizeof(float), stream) != cudaSuccess) {
      cudaGetLastError();
      return internal(op, "cudaMemsetAsync failed");
    }
    if ((cols + kValueCols - 1) / kValueCols > 65535)
      return invalid(op, "x has " + std::to_string(cols) + " columns; at most " + std::to_string(65535 * kValueCols));
    constexpr int W = vec_width<T>();
    const bool whole = cols % W == 0 && vector_aligned<W>(x, q);
    if (rows > 0 && cols > 0) {
      const auto range_blocks = [&](int w) {
        return dim3(static_cast<unsigned>((rows + kRangeRows - 1) / kRangeRows),
                    static_cast<unsigned>((cols + 32 * w - 1) / (32 * w)));
      };
      if (whole)
        ranges_kernel<W><<<range_blocks(W), kRangeThreads, 0, stream>>>(rows, cols, x, scale, scale_t);
      else
        ranges_kernel<1><<<range_blocks(1), kRangeThreads, 0, stream>>>(rows, cols, x, scale, scale_t);
    }
    const int64_t count = rows + cols;
    if (count > 0)
      scales_kernel<<<static_cast<int>(std::min<int64_t>((count + 255) / 256, 1024)), 256, 0, stream>>>(
          quant, count, scale, rows, scale_t);
    if (padded > 0 && cols > 0) {
      const dim3 blocks(static_cast<unsigned>((padded + kValueRows - 1) / kValueRows),
                        static_cast<unsigned>((cols + kValueCols - 1) / kValueCols));
      if (whole)
        values_kernel<W><<<blocks, kValueThreads, 0, stream>>>(quant, rows, cols, padded, x, q, scale, q_t, scale_t);
      else
        values_kernel<1><<<blocks, kValueThreads, 0, stream>>>(quant, rows, cols, padded, x, q, scale, q_t, scale_t);
    }
    return launch_error();
  }

  // The fused rows use W-vectors when W divides D (and the buffers are aligned), else W = 1.
  template <int W, class... Ps>
  static bool whole_vectors(int64_t cols, const Ps&... ptrs) {
    return cols % W == 0 && vector_aligned<W>(ptrs...);
  }

  template <class T, class Q, class Out>
  ffi::Error norm_rows(const NormQuantizeRows<T, Q, Out>& io, int64_t rows, int64_t cols) const {
    if (rows == 0) return ffi::Error::Success();
    constexpr int W = vec_width<Out, T>();
    if (whole_vectors<W>(cols, io.x, io.residual, io.weight, io.r_out, io.out)) return launch_norm<W>(io, rows, cols);
    return launch_norm<1>(io, rows, cols);
  }

  // The norm's threads: about kNormVectors vectors each, a function of D alone (the order of the
  // row's sum of squares). On an H200 two a thread beat four (the decode row 4.1 -> 3.3 us, 8192 rows
  // 115 -> 91 us at D 4096) and one (3.2 us, 105 us).
  template <int W, class T, class Q, class Out>
  ffi::Error launch_norm(const NormQuantizeRows<T, Q, Out>& io, int64_t rows, int64_t cols) const {
    const int64_t nvec = cols / W;
    const int threads = fused_threads(nvec, kNormVectors);
    const int64_t per_thread = (nvec + threads - 1) / threads;
    const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t{1} << 20));
    if (per_thread <= 1)
      norm_row_kernel<W, 1><<<grid, threads, 0, stream>>>(io, rows, cols);
    else if (per_thread <= 2)
      norm_row_kernel<W, 2><<<grid, threads, 0, stream>>>(io, rows, cols);
    else
      norm_row_kernel<W, kNormCache><<<grid, threads, 0, stream>>>(io, rows, cols);
    return launch_error();
  }

  template <class T, class G>
  ffi::Error norm_grad_rows(const NormGradRows<T, G>& io, int64_t rows, int64_t cols) const {
    if (cols == 0) return ffi::Error::Success();
    constexpr int W = vec_width<T>();
    if (rows > 0) {
      const bool whole = whole_vectors<W>(cols, io.g, io.r, io.weight, io.g_residual, io.dx);
      BJ_TRY(whole ? launch_norm_grad<W>(io, rows, cols) : launch_norm_grad<1>(io, rows, cols));
    }
    const int64_t groups_of_columns = (cols + kSumColumns - 1) / kSumColumns;
    dw_sum_kernel<<<static_cast<int>(groups_of_columns), kSumColumns * NormGradRows<T, G>::kDwSlices, 0, stream>>>(
        io, cols);
    return launch_error();
  }

  template <int W, class T, class G>
  ffi::Error launch_norm_grad(const NormGradRows<T, G>& io, int64_t rows, int64_t cols) const {
    const int64_t nvec = cols / W;
    // a block works through its group's rows one after another: at least four warps a block
    const int threads = fused_threads(nvec, kGradCache, 128);
    const int64_t streamed = std::max<int64_t>(0, nvec - int64_t{kGradCache} * threads);
    const size_t smem = static_cast<size_t>(streamed) * W * sizeof(math_t<T>);
    const auto kernel = norm_grad_kernel<W, T, G>;
    if (smem > 48 * 1024 && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem)) != cudaSuccess) {
      cudaGetLastError();
      return invalid(op, "rows of " + std::to_string(cols) + " values are too long for this GPU's shared memory");
    }
    kernel<<<static_cast<int>(io.groups), threads, smem, stream>>>(io, rows, cols);
    return launch_error();
  }

  template <class Op, class Out, class M, class... In>
  ffi::Error reduce_rows(const Op& op, int64_t rows, int64_t cols, Out* out, M* sums, const In*... in) const {
    if (rows == 0) return ffi::Error::Success();
    constexpr int W = vec_width<Out, In...>();
    const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t{1} << 20));
    const auto threads = [&](int64_t nvec) { return row_threads(nvec, vectors_per_thread(rows * nvec, 4)); };
    if (vector_aligned<W>(out, in...)) {
      reduce_row_kernel<W><<<grid, threads(cols / W), 0, stream>>>(op, rows, cols, out, sums, in...);
    } else {
      reduce_row_kernel<1><<<grid, threads(cols), 0, stream>>>(op, rows, cols, out, sums, in...);
    }
    return launch_error();
  }

  // Vectors per thread for a launch over `vectors`: up to `most` (several loads in flight), but
  // no more than keeps every thread slot of the GPU busy. Small shapes are bound by the latency
  // of one pass, not by bandwidth, and finish sooner spread over more threads.
  static int vectors_per_thread(int64_t vectors, int most) {
    DeviceAttributes device;
    if (!current_device(device)) return most;  // not fatal: the launch works with any count
    const int64_t slots = int64_t{device.sms} * device.threads_per_sm;
    return static_cast<int>(std::clamp<int64_t>((vectors + slots - 1) / slots, 1, most));
  }

  // Threads for a block that owns a row of `nvec` vectors, about `per_thread` vectors each.
  static int row_threads(int64_t nvec, int per_thread) {
    return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (nvec / per_thread + 31) / 32 * 32)));
  }

  // Threads for a fused row of `nvec` vectors, `per_thread` vectors each: a function of D alone,
  // so that a row's sums are added in the same order whatever the number of rows. Small blocks
  // leave room for many rows per SM, whose loads overlap each other's reductions.
  static int fused_threads(int64_t nvec, int per_thread, int at_least = 32) {
    const int64_t most_useful = std::max<int64_t>(32, (nvec + 31) / 32 * 32);
    const int64_t lower = std::min<int64_t>(at_least, most_useful);
    return static_cast<int>(std::clamp<int64_t>((nvec / per_thread + 31) / 32 * 32, lower, kMaxThreads));
  }

  ffi::Error launch_error() const {
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
      return internal(op, std::string("kernel launch failed: ") + cudaGetErrorString(err));
    return ffi::Error::Success();
  }
};

}  // namespace

int64_t cuda_handler_calls() { return handler_calls.load(); }

}  // namespace baracuda

using namespace baracuda;

// The handler of a row of ffi/ops.def: counts the call, then runs the row's body on a CudaExec
// built from the row's name and XLA's stream. No allocation and no host sync inside: safe to
// capture in a command buffer.
#define BJ_OP(name, body, bind)                                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(baracuda_##name##_cuda,                                          \
                                [](cudaStream_t stream, auto... operands) {                      \
                                  handler_calls.fetch_add(1, std::memory_order_relaxed);         \
                                  return body(CudaExec{#name, stream}, std::move(operands)...);  \
                                },                                                               \
                                bind(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()), \
                                {ffi::Traits::kCmdBufferCompatible});
#define BJ_CUDA_OP(name, body, bind) BJ_OP(name, body, bind)
#include "ffi/ops.def"
