"""How closely the fused ops' CPU twin, CUDA kernel and jnp reference agree on general data, where
their sums of squares run in different orders (on integer-valued data they agree bit for bit: the tests).

    python benchmarks/fused_agreement.py        # needs a GPU for the CPU-GPU column

Prints, per dtype pair, the fraction of quantized values that differ (each by one step) and the
largest relative difference of the dynamic scales.
"""

import os

# The reference on a GPU needs IEEE f32 division to compute the contract (see tests/conftest.py);
# the option is the GPU backend's alone.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_extra_options=-nvptx-prec-divf32=2"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import baracuda_jax as bj  # noqa: E402
from baracuda_jax import reference as ref  # noqa: E402


def run(device, fn, *args):
    return jax.jit(fn)(*jax.device_put(args, device))


def compare(a, b):
    (qa, sa), (qb, sb) = ((np.asarray(q.astype(jnp.float32)), np.asarray(s)) for q, s in (a, b))
    return (qa != qb).mean(), float(np.max(np.abs(sa - sb) / sa))


def main():
    devices = {"cpu": jax.devices("cpu")[0]}
    if bj.gpu_kernels_available():
        devices["gpu"] = jax.devices("gpu")[0]
    r = np.random.default_rng(0)
    shape = (4096, 4096)
    print(f"{shape[0]} x {shape[1]} normal values with a residual; differing q fraction, max scale rel. diff")
    for x_dtype in (jnp.bfloat16, jnp.float32):
        for fmt in (jnp.int8, jnp.float8_e4m3fn):
            x, res = (jnp.asarray(r.normal(size=shape).astype(np.float32)).astype(x_dtype) for _ in range(2))
            w = jnp.asarray(r.uniform(0.5, 1.5, shape[-1]).astype(np.float32)).astype(x_dtype)
            ours = lambda x, w, res: bj.rms_norm_quantize_per_token(x, w, residual=res, dtype=fmt)[:2]
            theirs = lambda x, w, res: ref.rms_norm_quantize_per_token(x, w, residual=res, dtype=fmt)[:2]
            got = {name: run(d, ours, x, w, res) for name, d in devices.items()}
            line = [f"{jnp.dtype(x_dtype).name}->{jnp.dtype(fmt).name}:"]
            for name, d in devices.items():
                line.append("%s vs reference %.2e, %.1e" % ((name,) + compare(got[name], run(d, theirs, x, w, res))))
            if "gpu" in got:
                line.append("cpu vs gpu %.2e, %.1e" % compare(got["cpu"], got["gpu"]))
            print("  ".join(line))


if __name__ == "__main__":
    main()
