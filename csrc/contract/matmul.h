// The scaled matmul's epilogue, the same on host and device: the steps of the jnp reference
// (reference.scaled_matmul) after the sum, which every GPU route applies in its own kernel.
#pragma once

#include "contract/scalar.h"

namespace baracuda {

// out = round_to_Out((float(sum) * a_scale) * b_scale [+ float(residual)]): each multiply and
// the add rounded in float32 (no FMA: the kernels build with --fmad=false), then once to Out.
// `sum` is the exact int32 sum (int8) or the float32 one (float8).
template <class Out, class Sum>
BJ_HD Out scaled_output(Sum sum, float a_scale, float b_scale, const Out* residual) {
  float v = (static_cast<float>(sum) * a_scale) * b_scale;
  if (residual != nullptr) v = v + to_math(*residual);
  return From<Out>::math(v);
}

}  // namespace baracuda
