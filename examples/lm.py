"""A byte-level transformer LM on the Python standard library's own source: trained in float, with
QAT (the fused ops) and in float8 (`fp8_matmul`), then served in W8A8 through the fused W8A8 ops.

    python examples/lm.py [--steps 1500] [--seeds 4] [--variants float,fp8_rowwise] [--time]
        [--png examples/lm_loss.png] [--json out.json]

Data: the .py files of this Python's standard library (every machine has them; tests, codec tables and
pydoc's topics left out), bytes, split by file: every tenth file is validation. Model: decoder-only,
pre-norm (RMSNorm), causal attention with RoPE (cuDNN's fused attention on a GPU), SwiGLU FFN.

Variants, trained with the same steps, seed and batches (one jitted step each):
- float;
- QAT of the activations: `rms_norm_fake_quantize_per_token` before the QKV and gate/up
  projections, `fake_quantize_per_token_dynamic` before the attention's output projection, and
  `silu_mul_fake_quantize_per_token` before the down projection, in int8, float8 e4m3, or 4 bits
  (int8 storage, qmin -8, qmax 7); the weights stay float in training (served per output channel);
- LSQ at 4 bits: a learned step per projection (`fake_quantize_per_token(learnable_scale=True)`);
- float8 training: every projection (QKV, out, gate/up, down) through `fp8_matmul`, the forward,
  dgrad and wgrad in float8 e4m3, by the rowwise or the blockwise recipe (weights and activations
  quantized; the embedding and the unembedding stay float);
- PTQ: the float model evaluated through each variant's quantizers.

Inference: the trained weights quantized per output channel (`quantize_weight`), each projection one
W8A8 op (`rms_norm_w8a8_matmul`, `w8a8_matmul`, `silu_mul_w8a8_matmul`: the producer's per-token
quantizer and the scaled product, the skip connections in its epilogue): served from the int8 and
fp8 QAT weights and from each float8-trained model (in e4m3). With --time (a GPU),
prefill and decode (KV cache, donated: updated in place; batch 1, 16, 64) tokens/s against the same
model in bf16, and a generated sample; then the same timings at D 2048 (WIDE, untrained), where the
projections are large enough for 8 bits to pay. With --seeds N every variant trains N times, and the
run prints the targets' figures seed by seed.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import pathlib
import statistics
import sysconfig
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import baracuda_jax as bj


@dataclasses.dataclass(frozen=True)
class Config:
    d: int = 512
    layers: int = 4
    heads: int = 8
    ffn: int = 1408
    seq: int = 256
    batch: int = 32
    steps: int = 1500
    lr: float = 2e-3
    weight_decay: float = 0.1
    corpus_bytes: int = 16 << 20  # read at most this much source
    eval_batches: int = 64
    dtype: str = "bfloat16"  # the activations' type in training (the parameters are float32)


# D and FFN multiples of 128: every projection fits fp8_matmul's blockwise recipe
TINY = Config(
    d=128, layers=1, heads=2, ffn=128, seq=64, batch=8, steps=40, corpus_bytes=400_000, eval_batches=2, dtype="float32"
)

# The timing-only width (untrained weights): projections large enough for an 8-bit GEMM to pay.
WIDE = dict(d=2048, heads=16, ffn=5632)

# name -> the activation quantizer's grid (None: float); "lsq" learns its steps; a "recipe" trains
# every projection through fp8_matmul instead
VARIANTS = {
    "float": None,
    "int8": dict(dtype=jnp.int8),
    "fp8": dict(dtype=jnp.float8_e4m3fn),
    "int4": dict(dtype=jnp.int8, qmin=-8, qmax=7),
    "int4 lsq": dict(dtype=jnp.int8, qmin=-8, qmax=7, lsq=True),
    "fp8_rowwise": dict(recipe="rowwise"),
    "fp8_blockwise": dict(recipe="blockwise"),
}
FP8_TRAINED = tuple(v for v, grid in VARIANTS.items() if grid and "recipe" in grid)


# ---- data -------------------------------------------------------------------------------------------

# Data written as Python rather than Python code: the codecs' tables and pydoc's topic text (2 MB,
# whose near-copies in both splits made the validation loss depend on whether a run learnt to copy).
NOT_CODE = ("site-packages", f"{os.sep}test", f"{os.sep}encodings{os.sep}", f"{os.sep}pydoc_data{os.sep}")


def load_corpus(max_bytes):
    """(train, validation) byte arrays from the standard library's .py files (tests and NOT_CODE
    left out), split by file."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(
        f
        for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if not any(part in f[len(root) :] for part in NOT_CODE)
    )
    train, val, total = [], [], 0
    for i, f in enumerate(files):
        data = pathlib.Path(f).read_bytes()
        (val if i % 10 == 9 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    as_array = lambda parts: np.frombuffer(b"\0".join(parts), np.uint8)
    return as_array(train), as_array(val)


def windows(data, rng, batch, seq):
    starts = rng.integers(0, len(data) - seq - 1, batch)
    idx = starts[:, None] + np.arange(seq + 1)
    return jnp.asarray(data[idx].astype(np.int32))


# ---- the model ----------------------------------------------------------------------------------


def init(cfg, key):
    keys = iter(jax.random.split(key, 4 * cfg.layers + 2))
    dense = lambda k, n: jax.random.normal(next(keys), (k, n), jnp.float32) / math.sqrt(k)
    depth = math.sqrt(2 * cfg.layers)  # scales down the projections into the residual stream
    layers = [
        dict(
            norm1=jnp.ones(cfg.d),
            wqkv=dense(cfg.d, 3 * cfg.d),
            wo=dense(cfg.d, cfg.d) / depth,
            norm2=jnp.ones(cfg.d),
            w13=dense(cfg.d, 2 * cfg.ffn),
            w2=dense(cfg.ffn, cfg.d) / depth,
        )
        for _ in range(cfg.layers)
    ]
    return dict(
        embed=jax.random.normal(next(keys), (256, cfg.d)) * 0.02,
        layers=layers,
        norm=jnp.ones(cfg.d),
        head=dense(cfg.d, 256),
        steps=jnp.ones((cfg.layers, 4)),
    )  # steps: LSQ's, one per projection


def rms_norm(x, w, eps=1e-6):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps) * w.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions):
    """Rotary position embedding of x [B, S, H, hd] at positions [S] (half-split pairs, base 10000)."""
    half = x.shape[-1] // 2
    angles = positions[:, None].astype(jnp.float32) * 10000.0 ** (-jnp.arange(half) / half)
    cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def attention(qkv, heads, cache=None, pos=0):
    """Causal attention of qkv [B, S, 3D] at positions pos..pos+S-1. With a cache (k, v [B, T, H, hd]),
    the new keys and values are written into it and the queries attend to its first pos + S entries
    (pos = 0 when S > 1: a prefill). cuDNN's fused attention without a cache on a GPU (16-bit data),
    XLA's elsewhere."""
    b, s, three_d = qkv.shape
    q, k, v = jnp.split(qkv.reshape(b, s, 3, heads, three_d // (3 * heads)), 3, axis=2)
    positions = pos + jnp.arange(s)
    q, k, v = rope(q[:, :, 0], positions), rope(k[:, :, 0], positions), v[:, :, 0]
    lengths = None
    if cache is not None:
        k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, pos, 0, 0))
        v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, pos, 0, 0))
        cache, lengths = (k, v), jnp.full((b,), pos + s, jnp.int32)
    fused = cache is None and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    out = jax.nn.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        is_causal=s > 1,
        key_value_seq_lengths=lengths,
        implementation="cudnn" if fused else "xla",
    )
    return out.reshape(b, s, -1), cache


class FloatOps:
    """The projections in the compute dtype: the float model (and the bf16 baseline)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def matmul(self, a, w):
        return a @ w.astype(a.dtype)

    def norm_proj(self, x, norm, w, i, j):
        return self.matmul(rms_norm(x, norm.astype(x.dtype)), w)

    def gate_up(self, x, norm, w, i, j):
        """(gate, up) of the FFN: one projection, split."""
        return jnp.split(self.norm_proj(x, norm, w, i, j), 2, axis=-1)

    def proj_add(self, a, w, residual, i, j):
        return residual + self.matmul(a, w)

    def silu_proj_add(self, g, u, w, residual, i, j):
        return residual + self.matmul(jax.nn.silu(g) * u, w)


class Fp8Ops(FloatOps):
    """Every projection through fp8_matmul with `recipe`: forward, dgrad and wgrad in float8 e4m3.

    The float32 weights go in as they are (no bf16 cast): the forward then quantizes exactly the weight
    that quantize_for_inference serves, and the weight gradient comes back in float32."""

    def __init__(self, dtype, recipe):
        super().__init__(dtype)
        self.recipe = recipe

    def matmul(self, a, w):
        return bj.fp8_matmul(a, w, recipe=self.recipe)


class QatOps(FloatOps):
    """Fake-quantized activations: the fused ops (dynamic scales), or LSQ's learned steps."""

    def __init__(self, dtype, grid, steps):
        super().__init__(dtype)
        self.grid = {k: v for k, v in grid.items() if k != "lsq"}
        self.steps = steps if grid.get("lsq") else None

    def _lsq(self, h, i, j):
        step = jnp.broadcast_to(self.steps[i, j], h.shape[:-1]).astype(jnp.float32)
        grad_scale = 1 / math.sqrt(h.shape[-1] * self.grid["qmax"])
        return bj.fake_quantize_per_token(h, step, learnable_scale=True, grad_scale=grad_scale, **self.grid)

    def norm_proj(self, x, norm, w, i, j):
        if self.steps is None:
            h, _ = bj.rms_norm_fake_quantize_per_token(x, norm.astype(x.dtype), **self.grid)
        else:
            h = self._lsq(rms_norm(x, norm), i, j)
        return self.matmul(h, w)

    def proj_add(self, a, w, residual, i, j):
        a = bj.fake_quantize_per_token_dynamic(a, **self.grid) if self.steps is None else self._lsq(a, i, j)
        return residual + self.matmul(a, w)

    def silu_proj_add(self, g, u, w, residual, i, j):
        if self.steps is None:
            m = bj.silu_mul_fake_quantize_per_token(g, u, **self.grid)
        else:
            m = self._lsq(jax.nn.silu(g) * u, i, j)
        return residual + self.matmul(m, w)


class W8A8Ops:
    """Real 8-bit inference in bf16: per-token activations in `fmt`, per-channel weights (QuantizedWeight)."""

    dtype = jnp.bfloat16

    def __init__(self, fmt):
        self.fmt = fmt

    def norm_proj(self, x, norm, w, i, j):
        return bj.rms_norm_w8a8_matmul(x, norm, w)[0]

    def gate_up(self, x, norm, w, i, j):
        """Gate and up stored apart, so that the SiLU op reads them without the copies a split of one
        [.., 2F] product would make (a custom call takes whole buffers). Each product normalizes x
        again: at decode sizes in the same custom call, where the weight stream hides it."""
        return [bj.rms_norm_w8a8_matmul(x, norm, half)[0] for half in w]

    def proj_add(self, a, w, residual, i, j):
        return bj.w8a8_matmul(a, w, residual=residual)

    def silu_proj_add(self, g, u, w, residual, i, j):
        return bj.silu_mul_w8a8_matmul(g, u, w, residual=residual)


def quantize_for_inference(params, dtype):
    """Each projection's weight [K, N] quantized per output channel (a QuantizedWeight); the norms in
    bf16 (the fused ops take the data's dtype)."""
    quantize = lambda w: bj.quantize_weight(w, dtype=dtype)
    layers = [
        dict(
            p,
            wqkv=quantize(p["wqkv"]),
            wo=quantize(p["wo"]),
            w2=quantize(p["w2"]),
            w13=[quantize(w) for w in jnp.split(p["w13"], 2, axis=1)],  # gate and up apart
            norm1=p["norm1"].astype(jnp.bfloat16),
            norm2=p["norm2"].astype(jnp.bfloat16),
        )
        for p in params["layers"]
    ]
    return dict(params, layers=layers)


def forward(params, tokens, ops, heads, caches=None, pos=0):
    """Logits [B, S, 256] (float32); with caches (one (k, v) per layer), also the updated caches."""
    x = params["embed"][tokens].astype(ops.dtype)
    new_caches = []
    for i, p in enumerate(params["layers"]):
        a, cache = attention(
            ops.norm_proj(x, p["norm1"], p["wqkv"], i, 0), heads, None if caches is None else caches[i], pos
        )
        new_caches.append(cache)
        x = ops.proj_add(a, p["wo"], x, i, 1)
        g, u = ops.gate_up(x, p["norm2"], p["w13"], i, 2)
        x = ops.silu_proj_add(g, u, p["w2"], x, i, 3)
    logits = rms_norm(x, params["norm"]).astype(jnp.float32) @ params["head"]
    return logits if caches is None else (logits, new_caches)


def loss_of(logits, targets):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def ops_for(variant, cfg, params):
    grid, dtype = VARIANTS[variant], jnp.dtype(cfg.dtype)
    if grid is None:
        return FloatOps(dtype)
    return Fp8Ops(dtype, grid["recipe"]) if "recipe" in grid else QatOps(dtype, grid, params["steps"])


# ---- training and evaluation ----------------------------------------------------------------------


def optimizer(cfg):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(100, cfg.steps // 10), cfg.steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def train_step(variant, cfg, opt):
    """One jitted step: (params, optimizer state, batch [B, S + 1]) -> (params, state, loss)."""

    def loss_fn(params, batch):
        return loss_of(forward(params, batch[:, :-1], ops_for(variant, cfg, params), cfg.heads), batch[:, 1:])

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def train(variant, cfg, data, seed=0, log=None):
    """(params, per-step losses) of one variant."""
    params = init(cfg, jax.random.key(seed))
    opt = optimizer(cfg)
    state, step = opt.init(params), train_step(variant, cfg, opt)
    rng = np.random.default_rng(seed)
    losses = []
    for i in range(cfg.steps):
        params, state, loss = step(params, state, windows(data[0], rng, cfg.batch, cfg.seq))
        losses.append(loss)  # kept on the device: no sync per step
        if log and (i + 1) % max(1, cfg.steps // 20) == 0:
            log(f"\r  {variant:<13} seed {seed} step {i + 1:>5}/{cfg.steps}  loss {np.mean(losses[-50:]):.3f}")
    if log:
        log("\n")
    return params, np.asarray(jnp.stack(losses))


def evaluate(params, ops, cfg, val, seed=1):
    """Mean validation loss (nats per byte) over fixed windows."""
    rng = np.random.default_rng(seed)
    f = jax.jit(lambda params, batch: loss_of(forward(params, batch[:, :-1], ops, cfg.heads), batch[:, 1:]))
    return float(np.mean([f(params, windows(val, rng, cfg.batch, cfg.seq)) for _ in range(cfg.eval_batches)]))


def evaluate_variants(trained, cfg, val):
    """{name: {"qat": loss, "ptq": loss}}: each trained variant through its own quantizers, the float model
    through each variant's (PTQ), and the W8A8 models served from the 8-bit QAT weights and from each
    float8-trained model's."""
    float_params = trained["float"][0]
    table = {}
    for v, (params, _) in trained.items():
        table[v] = dict(qat=evaluate(params, ops_for(v, cfg, params), cfg, val))
        if v != "float" and not VARIANTS[v].get("lsq"):
            table[v]["ptq"] = evaluate(float_params, ops_for(v, cfg, float_params), cfg, val)
    served = [("W8A8 int8", jnp.int8, "int8"), ("W8A8 fp8", jnp.float8_e4m3fn, "fp8")]
    served += [(f"W8A8 {v}", jnp.float8_e4m3fn, v) for v in FP8_TRAINED if v in trained]
    for name, dtype, source in served:
        params = trained[source][0] if source in trained else float_params
        table[name] = dict(qat=evaluate(quantize_for_inference(params, dtype), W8A8Ops(dtype), cfg, val))
    return table


def run(cfg, variants=tuple(VARIANTS), seeds=(0,), log=None):
    """Trains every variant once per seed (initialization and batches) and evaluates them. Returns
    ({name: {"qat": [loss per seed], "ptq": [...]}}, the first seed's {variant: (params, losses)}, data)."""
    data = load_corpus(cfg.corpus_bytes)
    table, first = {}, None
    for seed in seeds:
        trained = {v: train(v, cfg, data, seed, log) for v in variants}
        for name, row in evaluate_variants(trained, cfg, data[1]).items():
            for kind, loss in row.items():
                table.setdefault(name, {}).setdefault(kind, []).append(loss)
        first = first or trained
    return table, first, data


# ---- inference timing and generation ------------------------------------------------------------


def bf16_params(params):
    return jax.tree.map(lambda w: w.astype(jnp.bfloat16) if w.dtype == jnp.float32 else w, params)


def device_seconds(fn, args, reps=20, carry=None):
    """Median device seconds per call of jax.jit(fn)(*args), after a warm-up call. On a GPU, from a
    profiler trace: a call's time runs from its first kernel's start to its last kernel's end, so the
    host's dispatch between calls does not count. Elsewhere: the wall clock of one call at a time.

    With carry = i, args[i] is donated and fn returns (out, its next value), which the next call
    takes: a decode step's KV caches, updated in place rather than copied every step."""
    args = list(args)
    if carry is None:
        f = jax.jit(fn)
    else:
        step = jax.jit(fn, donate_argnums=carry)

        def f(*a):
            out, args[carry] = step(*a)
            return out

    def call():
        return f(*args)

    jax.block_until_ready(call())
    if jax.devices()[0].platform != "gpu":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(reps):
            out = call()
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        (trace,) = pathlib.Path(tmp).rglob("*.xplane.pb")
        profile = jax.profiler.ProfileData.from_file(str(trace))
    kernels = sorted(
        (e.start_ns, e.end_ns)
        for plane in profile.planes
        if plane.name.startswith("/device:GPU")
        for line in plane.lines
        if line.name.startswith("Stream")
        for e in line.events
    )
    if not kernels or len(kernels) % reps:
        raise RuntimeError(f"{len(kernels)} kernel records for {reps} calls: not the same kernels per call")
    k = len(kernels) // reps
    spans = [max(end for _, end in kernels[i : i + k]) - kernels[i][0] for i in range(0, len(kernels), k)]
    return statistics.median(spans) * 1e-9


def time_train_steps(cfg, data, reps=20):
    """Device seconds of one train step of each variant."""
    params, opt = init(cfg, jax.random.key(0)), optimizer(cfg)
    batch = windows(data[0], np.random.default_rng(0), cfg.batch, cfg.seq)
    return {v: device_seconds(train_step(v, cfg, opt), (params, opt.init(params), batch), reps) for v in VARIANTS}


def time_inference(params, cfg, reps=20, decode_batches=(1, 16, 64)):
    """tokens/s of prefill (batch 16 x 1024) and of one decode step (1024 cached; batch 1, 16 and 64,
    the caches donated) on this device, bf16 against W8A8 fp8 and int8 (device time: device_seconds)."""

    batch, length = 16, 1024
    hd = cfg.d // cfg.heads
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (batch, length)), jnp.int32)
    ways = {
        "bf16": (bf16_params(params), FloatOps(jnp.bfloat16)),
        "W8A8 fp8": (quantize_for_inference(params, jnp.float8_e4m3fn), W8A8Ops(jnp.float8_e4m3fn)),
        "W8A8 int8": (quantize_for_inference(params, jnp.int8), W8A8Ops(jnp.int8)),
    }
    out = {}
    for name, (p, ops) in ways.items():
        prefill = lambda p, t: forward(p, t, ops, cfg.heads)
        decode = lambda p, t, c: forward(p, t, ops, cfg.heads, c, length)
        out[name] = dict(prefill=batch * length / device_seconds(prefill, (p, tokens), reps))
        for b in decode_batches:
            cache = lambda: jnp.zeros((b, length + 1, cfg.heads, hd), jnp.bfloat16)
            caches = [(cache(), cache()) for _ in range(cfg.layers)]
            step = jnp.asarray(rng.integers(0, 256, (b, 1)), jnp.int32)
            out[name][f"decode_{b}"] = b / device_seconds(decode, (p, step, caches), reps, carry=2)
    return out


def generate(params, ops, cfg, prompt, n, temperature=0.7, seed=0):
    """n bytes sampled after `prompt`, one decode step each through the KV cache."""
    hd = cfg.d // cfg.heads
    tokens = jnp.asarray(np.frombuffer(prompt.encode(), np.uint8).astype(np.int32))[None]
    total = tokens.shape[1] + n
    cache = lambda: jnp.zeros((1, total, cfg.heads, hd), ops.dtype)
    caches = [(cache(), cache()) for _ in range(cfg.layers)]
    step = jax.jit(lambda p, t, c, pos: forward(p, t, ops, cfg.heads, c, pos), donate_argnums=2)
    logits, caches = step(params, tokens, caches, 0)
    out, key = [], jax.random.key(seed)
    for i in range(n):
        nxt = jax.random.categorical(jax.random.fold_in(key, i), logits[:, -1] / temperature)[:, None]
        nxt = nxt.astype(jnp.int32)
        out.append(int(nxt[0, 0]))
        logits, caches = step(params, nxt, caches, tokens.shape[1] + i)
    return prompt + bytes(out).decode("utf-8", "replace")


def plot(trained, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, (_, losses) in trained.items():
        k = max(1, len(losses) // 50)
        ax.plot(np.convolve(losses, np.ones(k) / k, mode="valid"), label=name)
    ax.set(xlabel="step", ylabel="train loss (nats / byte)", title="byte-level LM on the stdlib, QAT variants")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def bpb(losses):
    """'mean ± sd' in bits per byte of per-seed losses in nats per byte."""
    b = np.asarray(losses) / math.log(2)
    return f"{b.mean():.4f} ± {b.std():.4f}" if len(b) > 1 else f"{b[0]:.4f}"


def summary(table):
    """The targets' figures, per seed then mean and sd: each 8-bit QAT loss, each float8-trained one and
    its W8A8 model's against float's (%), and the share of 4-bit PTQ's gap that each 4-bit QAT run
    recovers."""
    f = np.asarray(table["float"]["qat"])
    compared = ("int8", "fp8", *FP8_TRAINED, *(f"W8A8 {v}" for v in FP8_TRAINED))
    out = {f"{v} vs float %": 100 * (np.asarray(table[v]["qat"]) / f - 1) for v in compared if v in table}
    if "int4" in table:
        gap = np.asarray(table["int4"]["ptq"]) - f
        for v in ("int4", "int4 lsq") if "int4 lsq" in table else ("int4",):
            out[f"{v} recovers % of PTQ gap"] = 100 * (np.asarray(table["int4"]["ptq"]) - table[v]["qat"]) / gap
    return {k: dict(per_seed=v.tolist(), mean=float(v.mean()), sd=float(v.std())) for k, v in out.items()}


def time_all(cfg, params, data, log):
    """Train-step device time of every variant, then W8A8 against bf16 inference, of `params` at `cfg`."""
    steps = {v: t * 1e6 for v, t in time_train_steps(cfg, data).items()}
    log(
        f"d={cfg.d} train step, device µs: "
        + ", ".join(f"{v} {t:.0f} ({t / steps['float']:.3f}x)" for v, t in steps.items())
        + "\n"
    )
    speed = time_inference(params, cfg)
    for name, s in speed.items():
        decode = "   ".join(f"{k.replace('_', ' batch ')} {v:>10,.0f}" for k, v in s.items() if k.startswith("decode"))
        log(f"d={cfg.d} {name:<10} prefill {s['prefill']:>12,.0f} tok/s   {decode} tok/s\n")
    return dict(train_step_us=steps, tokens_per_s=speed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=Config.steps)
    p.add_argument("--seeds", type=int, default=1, help="train every variant with seeds 0..N-1")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"a subset of {','.join(VARIANTS)}; float always trains (PTQ's source); --time needs fp8",
    )
    p.add_argument("--tiny", action="store_true", help="the test suite's configuration")
    p.add_argument(
        "--time",
        action="store_true",
        help="train-step time and prefill/decode tokens/s, bf16 vs "
        "W8A8, of the trained model and of the untrained WIDE one (meant for a GPU)",
    )
    p.add_argument("--png", default=None, help="save the loss curves here")
    p.add_argument("--json", type=pathlib.Path, default=None, help="write the table here")
    args = p.parse_args(argv)
    variants = tuple(dict.fromkeys(("float", *args.variants.split(","))))
    if not set(variants) <= set(VARIANTS) or (args.time and "fp8" not in variants):
        p.error(f"--variants {args.variants}: expected a subset of {','.join(VARIANTS)}, with fp8 for --time")
    cfg = TINY if args.tiny else dataclasses.replace(Config(), steps=args.steps)
    log = (lambda s: None) if args.tiny else (lambda s: print(s, end="", flush=True))
    table, trained, data = run(cfg, variants, tuple(range(args.seeds)), log)
    print(
        f"\n{jax.devices()[0].device_kind}, {cfg}, {args.seeds} seed(s)\n"
        f"{'variant':<18} {'QAT val bpb':>16} {'PTQ val bpb':>16}"
    )
    for name, row in table.items():
        print(f"{name:<18} {bpb(row['qat']):>16} {bpb(row['ptq']) if 'ptq' in row else '':>16}")
    result = dict(
        device=jax.devices()[0].device_kind, config=dataclasses.asdict(cfg), table=table, summary=summary(table)
    )
    for k, v in result["summary"].items():
        print(f"{k:<36} {v['mean']:+8.2f} ± {v['sd']:.2f}   per seed: " + " ".join(f"{x:+.2f}" for x in v["per_seed"]))
    save = lambda: args.json.write_text(json.dumps(result, indent=1)) if args.json else None
    save()  # after each part: a run cut short keeps what it measured
    if args.png:
        plot(trained, args.png)
    if args.time:
        result["timing"] = time_all(cfg, trained["fp8"][0], data, log)
        save()
        params = quantize_for_inference(trained["fp8"][0], jnp.float8_e4m3fn)
        result["sample"] = generate(params, W8A8Ops(jnp.float8_e4m3fn), cfg, "def ", 200)
        print("W8A8 fp8 sample:\n" + result["sample"])
        save()
        wide = dataclasses.replace(cfg, **WIDE)
        result["timing_wide"] = dict(config=WIDE, **time_all(wide, init(wide, jax.random.key(0)), data, log))
        save()
    return table


if __name__ == "__main__":
    main()
