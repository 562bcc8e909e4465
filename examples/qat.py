"""Quantization-aware training of a small MLP on scikit-learn's digits, three ways.

    python examples/qat.py [--steps 600] [--png examples/qat_loss.png]

- float: no quantization;
- qat: every activation goes through fake_quantize_per_token_dynamic (int8, symmetric) before its
  matmul, and jax.grad flows through the straight-through estimator;
- lsq: the same, with a learned step per layer (fake_quantize_per_token(learnable_scale=True)),
  initialised as in LSQ (2 * mean|x| / sqrt(qmax)) and with its gradient scale 1 / sqrt(numel * qmax).

Each train step is one jax.jit-compiled function. Prints the test accuracy of each, and saves the
loss curves when matplotlib is installed.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import baracuda_jax as bj

SIZES = (64, 128, 128, 10)
QMAX = 127


def load(seed=0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y.astype(np.int32), test_size=0.25, random_state=seed, stratify=y)


def init(key, x_sample):
    keys = jax.random.split(key, len(SIZES) - 1)
    params = {
        "w": [jax.random.normal(k, (i, o)) * math.sqrt(2 / i) for k, i, o in zip(keys, SIZES, SIZES[1:])],
        "b": [jnp.zeros(o) for o in SIZES[1:]],
    }
    # LSQ's initial step per layer, from the activations of the float model on a sample
    steps, h = [], x_sample
    for i, (w, b) in enumerate(zip(params["w"], params["b"])):
        steps.append(2 * jnp.mean(jnp.abs(h)) / math.sqrt(QMAX))
        h = h @ w + b
        if i < len(SIZES) - 2:
            h = jax.nn.relu(h)
    params["step"] = jnp.stack(steps)
    return params


def quantize_activation(h, mode, step):
    if mode == "qat":
        return bj.fake_quantize_per_token_dynamic(h)
    if mode == "lsq":
        scale = jnp.broadcast_to(step, h.shape[:-1])  # one learned step per layer, applied per token
        return bj.fake_quantize_per_token(h, scale, learnable_scale=True, grad_scale=1 / math.sqrt(h.size * QMAX))
    return h


def forward(params, x, mode):
    h = x
    for i, (w, b) in enumerate(zip(params["w"], params["b"])):
        h = quantize_activation(h, mode, params["step"][i]) @ w + b
        if i < len(SIZES) - 2:
            h = jax.nn.relu(h)
    return h


def loss_fn(params, x, y, mode):
    return cross_entropy(forward(params, x, mode), y)


def adam(lr=3e-3, b1=0.9, b2=0.999, eps=1e-8):
    def update(grads, state, params):
        m, v, t = state
        t = t + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        params = jax.tree.map(
            lambda p, m, v: p - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps), params, m, v
        )
        return params, (m, v, t)

    init_state = lambda params: (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params), 0)
    return init_state, update


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def fit(loss_fn, params, x, y, steps, batch=128, seed=0):
    """Adam on loss_fn(params, x, y) over random batches, one jitted step each: (params, losses)."""
    opt_init, opt_update = adam()
    opt_state = opt_init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        params, opt_state = opt_update(grads, opt_state, params)
        return params, opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        losses.append(float(loss))
    return params, losses


def train(mode, steps, batch=128, seed=0, data=None):
    """Returns (params, per-step losses, test accuracy) for one mode."""
    x_tr, x_te, y_tr, y_te = data or load(seed)
    params = init(jax.random.key(seed), jnp.asarray(x_tr[:256]))
    params, losses = fit(lambda p, x, y: loss_fn(p, x, y, mode), params, x_tr, y_tr, steps, batch, seed)
    return params, losses, accuracy(lambda x: forward(params, x, mode), x_te, y_te)


def accuracy(predict, x, y):
    return float(jnp.mean(jnp.argmax(jax.jit(predict)(jnp.asarray(x)), axis=-1) == jnp.asarray(y)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--png", default="examples/qat_loss.png")
    args = p.parse_args(argv)
    data = load()
    results = {mode: train(mode, args.steps, data=data) for mode in ("float", "qat", "lsq")}
    print(f"digits, {args.steps} steps of 128, test accuracy:")
    for mode, (_, _, acc) in results.items():
        print(f"  {mode:<6} {acc:.4f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return results
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, (_, losses, acc) in results.items():
        smooth = np.convolve(losses, np.ones(20) / 20, mode="valid")
        ax.plot(smooth, label=f"{mode} (test acc {acc:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (20-step mean)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")
    return results


if __name__ == "__main__":
    main()
