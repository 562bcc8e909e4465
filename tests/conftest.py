import importlib.util
import os

# On GPU, XLA lowers f32 division to an approximate div.full, and (allowed excess
# precision) removes a float32 -> float8 -> float32 round trip; the reference
# needs IEEE division and the round trip to match the kernels. Only the GPU
# backend knows these options, so they are set only where a CUDA plugin is installed.
if any(importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
    for flag in ("--xla_backend_extra_options=-nvptx-prec-divf32=2", "--xla_allow_excess_precision=false"):
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64 is part of the dtype matrix
jax.config.update("jax_num_cpu_devices", 4)  # host devices for the sharding tests


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


GPUS = _gpus()
DEVICES = [jax.devices("cpu")[0]] + GPUS[:1]


@pytest.fixture(params=DEVICES, ids=lambda d: d.platform)
def device(request):
    return request.param


requires_gpu = pytest.mark.skipif(not GPUS, reason="needs a CUDA GPU")


def assert_captured(fn, args, custom_calls, runs=10):
    """XLA replays fn's custom calls from a CUDA graph: after two runs (compile, then record), the
    handler bodies run fewer times than `custom_calls` per execution. Returns the last outputs."""
    from baracuda_jax import _cuda

    for _ in range(2):
        jax.block_until_ready(fn(*args))
    before = _cuda.handler_calls()
    for _ in range(runs):
        out = jax.block_until_ready(fn(*args))
    calls = _cuda.handler_calls() - before
    print(f"handler calls over {runs} runs of {custom_calls} custom calls: {calls}")
    assert calls < custom_calls * runs
    return out
