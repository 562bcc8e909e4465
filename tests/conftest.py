"""pytest setup: XLA flags for the GPU, jax's config, and the `device` fixture. The helpers the
test files share are in helpers.py."""

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

from helpers import DEVICES  # noqa: E402  (after the config: it lists the devices)


@pytest.fixture(params=DEVICES, ids=lambda d: d.platform)
def device(request):
    return request.param
