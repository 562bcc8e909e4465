"""The examples, in a small configuration."""

import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("optax")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))

import fp8_blockwise  # noqa: E402
import lm  # noqa: E402
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


def test_lm_tiny_config_trains_every_variant_and_serves_w8a8():
    """The transformer LM example at its tiny configuration: every variant trains (the loss falls) and
    evaluates to a finite loss, PTQ included, and the W8A8 models run, the float8-trained ones too."""
    table, trained, _ = lm.run(lm.TINY)
    assert set(trained) == set(lm.VARIANTS)
    for variant, (_, losses) in trained.items():
        assert np.mean(losses[-5:]) < losses[0] - 0.5, variant
    values = [loss for row in table.values() for k in ("qat", "ptq") if k in row for loss in row[k]]
    # 11 models (7 variants, 4 served), and PTQ at int8, fp8, int4 and both fp8_matmul recipes
    assert len(values) == 16 and np.all(np.isfinite(values))
    for variant in ("fp8", "fp8_rowwise", "fp8_blockwise"):  # the served model is the trained one
        assert abs(table[f"W8A8 {variant}"]["qat"][0] - table[variant]["qat"][0]) < 0.05, variant


@pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix")  # flax 0.12.8's deprecations, in qwix's calls
def test_flax_llama_tiny_trains_and_our_qwix_providers_match_qwix():
    """The Flax NNX Llama at its tiny configuration: float and both QT ways train (the loss falls),
    and our PTQ and QT models' validation losses are within 1 % of qwix's own providers'."""
    pytest.importorskip("qwix")
    pytest.importorskip("tqdm")
    import flax_llama

    table, curves, _, _ = flax_llama.run(flax_llama.TINY, bar=False)
    assert set(curves) == {"float", "QT qwix", "QT ours"}
    for name, losses in curves.items():
        assert np.mean(losses[-5:]) < losses[0] - 0.5, name
    assert len(table) == 7 and np.all(np.isfinite(list(table.values())))
    for pair, percent in flax_llama.summary(table).items():
        assert abs(percent) < 1.0, (pair, percent)
