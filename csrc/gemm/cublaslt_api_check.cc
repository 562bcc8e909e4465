// Compiled only where the build finds cublasLt.h: holds cublaslt_api.h's declarations to it.
#include <cublasLt.h>

#include <type_traits>

#include "gemm/cublaslt_api.h"

namespace lt = baracuda::lt;

static_assert(std::is_same_v<lt::Handle, cublasLtHandle_t>);
static_assert(std::is_pointer_v<cublasLtMatmulDesc_t> && std::is_pointer_v<cublasLtMatrixLayout_t> &&
              std::is_pointer_v<cublasLtMatmulPreference_t>);  // passed as opaque pointers
static_assert(sizeof(lt::Algo) == sizeof(cublasLtMatmulAlgo_t));
static_assert(sizeof(lt::HeuristicResult) == sizeof(cublasLtMatmulHeuristicResult_t));
static_assert(offsetof(lt::HeuristicResult, workspaceSize) == offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize));
static_assert(offsetof(lt::HeuristicResult, state) == offsetof(cublasLtMatmulHeuristicResult_t, state));
static_assert(sizeof(lt::Status) == sizeof(cublasStatus_t) && CUBLAS_STATUS_SUCCESS == 0);

static_assert(int{lt::kCompute32F} == int{CUBLAS_COMPUTE_32F} && int{lt::kCompute32I} == int{CUBLAS_COMPUTE_32I});
static_assert(int{lt::kOpN} == int{CUBLAS_OP_N} && int{lt::kOpT} == int{CUBLAS_OP_T});
static_assert(int{lt::kDescTransA} == int{CUBLASLT_MATMUL_DESC_TRANSA} &&
              int{lt::kDescTransB} == int{CUBLASLT_MATMUL_DESC_TRANSB});
static_assert(int{lt::kDescAScalePointer} == int{CUBLASLT_MATMUL_DESC_A_SCALE_POINTER});
static_assert(int{lt::kDescBScalePointer} == int{CUBLASLT_MATMUL_DESC_B_SCALE_POINTER});
static_assert(int{lt::kDescAScaleMode} == int{CUBLASLT_MATMUL_DESC_A_SCALE_MODE});
static_assert(int{lt::kDescBScaleMode} == int{CUBLASLT_MATMUL_DESC_B_SCALE_MODE});
static_assert(int{lt::kScaleOuterVec32F} == int{CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F});
static_assert(int{lt::kScaleVec128_32F} == int{CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F});
static_assert(int{lt::kScaleBlk128x128_32F} == int{CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F});
static_assert(int{lt::kPrefMaxWorkspaceBytes} == int{CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES});
