"""The examples, in a small configuration."""

import pathlib
import sys

import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))

import fp8_blockwise  # noqa: E402
import qat  # noqa: E402
import qat_ffn  # noqa: E402
import w8a8  # noqa: E402


def test_qat_trains_all_three_ways():
    data = qat.load()
    for mode in ("float", "qat", "lsq"):
        params, losses, acc = qat.train(mode, 200, data=data)
        assert losses[-1] < losses[0] / 3, mode
        assert acc > 0.85, (mode, acc)  # chance is 0.1


def test_qat_with_the_fused_ops_trains():
    import jax.numpy as jnp
    data = qat.load()
    for dtype in (None, jnp.int8, jnp.float8_e4m3fn):
        losses, acc = qat_ffn.train(dtype, 150, data=data)
        assert losses[-1] < losses[0] / 3, dtype
        assert acc > 0.85, (dtype, acc)


def test_w8a8_inference_keeps_the_accuracy():
    accuracy = w8a8.main(["--steps", "200"])
    assert accuracy["float"] > 0.85
    for fmt in ("int8", "float8_e4m3fn"):
        assert abs(accuracy[fmt] - accuracy["float"]) < 0.03, accuracy


def test_fp8_blockwise_trains_with_group_fake_quant_and_serves_blockwise():
    accuracy = fp8_blockwise.main(["--steps", "200"])
    assert accuracy["float"] > 0.85
    for name in ("PTQ fp8 blockwise", "QAT fp8 blockwise"):
        assert abs(accuracy[name] - accuracy["float"]) < 0.03, accuracy
