// The few cuBLASLt entry points the scaled matmul calls, declared here and loaded at run time.
//
// Why not #include <cublasLt.h>: the CUDA toolkit on the build machines has no cuBLAS headers
// (they come with the 600 MB nvidia-cublas wheel), and a CPU-only install must import without
// the library. So the package declares the C ABI it uses (opaque handles, enum values, two
// structs) and dlopens libcublasLt the first time a scaled matmul is traced for a GPU.
// cublaslt_api_check.cc static_asserts every value and layout here against cublasLt.h wherever
// the build finds that header (the GPU machine's wheel), so a drift cannot pass unnoticed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <library_types.h>  // cudaDataType_t: the toolkit has it

struct cublasLtContext;  // cublasLt.h's handle tag (its other handles point to typedef'd structs)

namespace baracuda::lt {

using Status = int;  // cublasStatus_t: 0 is CUBLAS_STATUS_SUCCESS
using Handle = cublasLtContext*;
using MatmulDesc = struct MatmulDescOpaque*;
using MatrixLayout = struct MatrixLayoutOpaque*;
using Preference = struct PreferenceOpaque*;

struct Algo {  // cublasLtMatmulAlgo_t
  uint64_t data[8];
};
struct HeuristicResult {  // cublasLtMatmulHeuristicResult_t
  Algo algo;
  size_t workspaceSize;
  Status state;
  float wavesCount;
  int reserved[4];
};

// The enum values used (all int32 in the ABI).
enum ComputeType : int32_t { kCompute32F = 68, kCompute32I = 72 };  // cublasComputeType_t
enum Operation : int32_t { kOpN = 0, kOpT = 1 };                     // cublasOperation_t
enum DescAttribute : int32_t {                                       // cublasLtMatmulDescAttributes_t
  kDescTransA = 3,
  kDescTransB = 4,
  kDescAScalePointer = 17,
  kDescBScalePointer = 18,
  kDescAScaleMode = 31,
  kDescBScaleMode = 32,
};
enum MatrixScale : int32_t {  // cublasLtMatmulMatrixScale_t
  kScaleOuterVec32F = 3,        // one per row (or column) of op(X)
  kScaleVec128_32F = 4,         // one per 1 x 128 group along K
  kScaleBlk128x128_32F = 5,     // one per 128 x 128 block
};
enum PreferenceAttribute : int32_t { kPrefMaxWorkspaceBytes = 1 };     // cublasLtMatmulPreferenceAttributes_t

// The first cuBLASLt with per-row x per-column (outer vector) and blockwise FP8 scales.
constexpr size_t kOuterVectorVersion = 120900;

struct Api {
  size_t version;  // cublasLtGetVersion(): 130100 for 13.1
  Status (*create)(Handle*);
  Status (*desc_create)(MatmulDesc*, ComputeType, cudaDataType_t scale_type);
  Status (*desc_destroy)(MatmulDesc);
  Status (*desc_set)(MatmulDesc, DescAttribute, const void* value, size_t size);
  Status (*layout_create)(MatrixLayout*, cudaDataType_t, uint64_t rows, uint64_t cols, int64_t ld);
  Status (*layout_destroy)(MatrixLayout);
  Status (*preference_create)(Preference*);
  Status (*preference_destroy)(Preference);
  Status (*preference_set)(Preference, PreferenceAttribute, const void* value, size_t size);
  Status (*heuristic)(Handle, MatmulDesc, MatrixLayout a, MatrixLayout b, MatrixLayout c, MatrixLayout d, Preference,
                      int requested, HeuristicResult* results, int* returned);
  Status (*matmul)(Handle, MatmulDesc, const void* alpha, const void* a, MatrixLayout, const void* b, MatrixLayout,
                   const void* beta, const void* c, MatrixLayout, void* d, MatrixLayout, const Algo*, void* workspace,
                   size_t workspace_size, cudaStream_t);
};

// Loads the first of `candidates` (paths or sonames) that opens and has every entry point, once
// for the process; later calls return the same library. Returns null with `error` set on failure.
const Api* load(const std::vector<std::string>& candidates, std::string* error);

// The library `load` found, or null before (or without) it.
const Api* api();

}  // namespace baracuda::lt
