"""A Llama-style decoder in Flax NNX, quantized with qwix: qwix's own providers against baracuda_jax's
(`baracuda_jax.qwix`), for W8A8 serving (PTQ) and for float8 training (QT).

    python examples/flax_llama.py [--steps 1000] [--time] [--wide] [--stack] [--json out.json]
        [--png examples/flax_llama.png]

The model: byte-level, pre-norm (`nnx.RMSNorm`), grouped-query attention with RoPE through
`jax.nn.dot_product_attention` (cuDNN's on a GPU), SwiGLU FFN, every projection an `nnx.Linear`
named `*_proj`; the embedding and the LM head stay float. Data: the standard library's source, as in
lm.py. Trained three ways with the same seed and batches:

- float: float32 params, bfloat16 activations (bf16 in the default config);
- QT through `qwix.QtProvider` and through `baracuda_jax.qwix.QtProvider`, one rule for every
  projection: float8 e4m3 forward and backward (`bwd_qtype`); ours runs `bj.fp8_matmul`.

Then the float model is quantized by `qwix.quantize_model` with each PTQ provider, int8 and float8
e4m3 (per channel, activations per token): validation loss (bits per byte) of each; with --time (a
GPU), prefill (batch 16 x 1024) and decode (KV cache, batch 1, 16 and 64) tokens/s against the float
model in bf16, and each QT train step's time against float training's. --wide times the same at
D 2048 (untrained weights); --stack times the 4-block SwiGLU stack of D 4096, F 14336 in bf16 at 16,
256 and 4096 tokens (the PTQ forward; a QT train step at 4096).
"""

import argparse
import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import lm  # the sibling example: the corpus, the optimizer, the device timer
import numpy as np
import optax
import qwix
from flax import nnx
from tqdm import tqdm

import baracuda_jax.qwix as bq

F32, BF16, I8, F8 = jnp.float32, jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Config:
    d: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 1408
    seq: int = 256
    batch: int = 32
    steps: int = 1000
    lr: float = 2e-3
    weight_decay: float = 0.1
    corpus_bytes: int = 16 << 20
    eval_batches: int = 32
    dtype: str = "bfloat16"  # the activations' (the params are float32)


# The test suite's: D and F multiples of 128, float32 (the CPU's fast path)
TINY = Config(
    d=128,
    layers=1,
    heads=2,
    kv_heads=1,
    ffn=256,
    seq=64,
    batch=8,
    steps=30,
    corpus_bytes=400_000,
    eval_batches=2,
    dtype="float32",
)
# The timing-only width (untrained weights), as lm.py's
WIDE = dict(d=2048, heads=16, kv_heads=4, ffn=5632)

PROVIDERS = {"qwix": (qwix.PtqProvider, qwix.QtProvider), "ours": (bq.PtqProvider, bq.QtProvider)}


def ptq_rules(fmt):
    """W8A8 for every projection: weights per output channel, activations per token, in fmt."""
    return [qwix.QuantizationRule(module_path=r".*_proj", weight_qtype=fmt, act_qtype=fmt)]


def qt_rules():
    """float8 e4m3 training of every projection: the forward and both gradients."""
    return [qwix.QtRule(module_path=r".*_proj", weight_qtype=F8, act_qtype=F8, bwd_qtype=F8)]


# ---- the model ----------------------------------------------------------------------------------


def linear(cfg, rngs, d_in, d_out, scale=1.0, dtype=None):
    init = nnx.initializers.variance_scaling(scale**2, "fan_in", "normal")
    return nnx.Linear(
        d_in, d_out, use_bias=False, dtype=dtype or cfg.dtype, param_dtype=F32, kernel_init=init, rngs=rngs
    )


class Attention(nnx.Module):
    """Grouped-query causal attention with RoPE; with a KV cache (k, v [B, T, kv_heads, hd]) the new keys
    and values are written at pos and the queries attend to the first pos + S."""

    def __init__(self, cfg, rngs, depth):
        hd = cfg.d // cfg.heads
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.q_proj = linear(cfg, rngs, cfg.d, cfg.heads * hd)
        self.k_proj = linear(cfg, rngs, cfg.d, cfg.kv_heads * hd)
        self.v_proj = linear(cfg, rngs, cfg.d, cfg.kv_heads * hd)
        self.o_proj = linear(cfg, rngs, cfg.heads * hd, cfg.d, scale=1 / depth)

    def __call__(self, x, cache=None, pos=0):
        b, s, _ = x.shape
        positions = pos + jnp.arange(s)
        q = lm.rope(self.q_proj(x).reshape(b, s, self.heads, -1), positions)
        k = lm.rope(self.k_proj(x).reshape(b, s, self.kv_heads, -1), positions)
        v = self.v_proj(x).reshape(b, s, self.kv_heads, -1)
        lengths = None
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, pos, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, pos, 0, 0))
            cache, lengths = (k, v), jnp.full((b,), pos + s, jnp.int32)
        out = jax.nn.dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            is_causal=s > 1,
            key_value_seq_lengths=lengths,
            implementation=None if cache is None else "xla",  # None: cuDNN's where it runs
        )
        return self.o_proj(out.reshape(b, s, -1)), cache


class SwiGLU(nnx.Module):
    def __init__(self, cfg, rngs, depth):
        self.gate_proj = linear(cfg, rngs, cfg.d, cfg.ffn)
        self.up_proj = linear(cfg, rngs, cfg.d, cfg.ffn)
        self.down_proj = linear(cfg, rngs, cfg.ffn, cfg.d, scale=1 / depth)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg, rngs):
        depth = math.sqrt(2 * cfg.layers)  # scales down the projections into the residual stream
        self.attn_norm = nnx.RMSNorm(cfg.d, epsilon=1e-6, dtype=cfg.dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs, depth)
        self.mlp_norm = nnx.RMSNorm(cfg.d, epsilon=1e-6, dtype=cfg.dtype, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs, depth)

    def __call__(self, x, cache=None, pos=0):
        a, cache = self.attn(self.attn_norm(x), cache, pos)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
    """Logits [B, S, 256] (float32) of byte tokens [B, S]; with caches (one (k, v) per layer) at
    position pos, also the updated caches."""

    def __init__(self, cfg, seed=0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(256, cfg.d, dtype=cfg.dtype, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.norm = nnx.RMSNorm(cfg.d, epsilon=1e-6, dtype=cfg.dtype, rngs=rngs)
        self.lm_head = linear(cfg, rngs, cfg.d, 256, dtype=F32)

    def __call__(self, tokens, caches=None, pos=0):
        x = self.embed(tokens)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, None if caches is None else caches[i], pos)
            new_caches.append(cache)
        logits = self.lm_head(self.norm(x)).astype(F32)
        return logits if caches is None else (logits, new_caches)


# ---- training and evaluation ----------------------------------------------------------------------


def train_step(model, opt):
    """(step, params): one jitted step (params, optimizer state, batch [B, S + 1]) -> (params, state,
    loss) of the model's nnx.Params, the rest of its state (qwix's, if any) held fixed."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        return lm.loss_of(nnx.merge(graph, params, rest)(batch[:, :-1]), batch[:, 1:])

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step, params


def train(model, cfg, data, name, seed=0, bar=True):
    """Trains the model in place; returns its per-step losses."""
    opt = lm.optimizer(cfg)
    step, params = train_step(model, opt)
    state, rng, losses = opt.init(params), np.random.default_rng(seed), []
    progress = tqdm(range(cfg.steps), desc=f"{name:<10}", disable=not bar, dynamic_ncols=True)
    for i in progress:
        params, state, loss = step(params, state, lm.windows(data[0], rng, cfg.batch, cfg.seq))
        losses.append(loss)  # kept on the device: no sync per step
        if (i + 1) % max(1, cfg.steps // 20) == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    nnx.update(model, params)
    return np.asarray(jnp.stack(losses))


def evaluate(model, cfg, val, seed=1):
    """Mean validation loss (nats per byte) over fixed windows."""
    graph, state = nnx.split(model)
    f = jax.jit(lambda s, batch: lm.loss_of(nnx.merge(graph, s)(batch[:, :-1]), batch[:, 1:]))
    rng = np.random.default_rng(seed)
    return float(np.mean([f(state, lm.windows(val, rng, cfg.batch, cfg.seq)) for _ in range(cfg.eval_batches)]))


def served(model, dtype):
    """The model with its float32 params in dtype, as it is served (a prepared weight's float32 scales,
    in qwix's WithAux `array`, stay as they are)."""
    graph, state = nnx.split(model)
    keep = lambda path: any(getattr(k, "key", None) == "array" for k in path)
    cast = lambda path, a: a if keep(path) or a.dtype != F32 else a.astype(dtype)
    return nnx.merge(graph, jax.tree_util.tree_map_with_path(cast, state))


def quantize(model, provider, rules, sample):
    """The model quantized by qwix with provider(rules), run once on sample (which prepares PTQ's weights)."""
    return qwix.quantize_model(model, provider(rules), sample)


def ptq_models(model, cfg, sample):
    """{name: the served model}: the float model with its params in the activations' dtype, and each PTQ
    provider's int8 and float8 models of it."""
    dtype = jnp.dtype(cfg.dtype)
    out = {"float": served(model, dtype)}
    for fmt in (I8, F8):
        for who, (ptq, _) in PROVIDERS.items():
            out[f"{who} {jnp.dtype(fmt).name}"] = served(quantize(model, ptq, ptq_rules(fmt), sample), dtype)
    return out


def run(cfg, bar=True):
    """Trains the float model and both QT ways, then evaluates those and the PTQ models. Returns (table {name:
    validation loss}, {name: per-step losses}, {name: model}, data)."""
    data = lm.load_corpus(cfg.corpus_bytes)
    sample = lm.windows(data[0], np.random.default_rng(0), 2, cfg.seq)[:, :-1]
    models, curves = {"float": Llama(cfg)}, {}
    for who, (_, qt) in PROVIDERS.items():
        models[f"QT {who}"] = quantize(Llama(cfg), qt, qt_rules(), sample)
    for name, model in models.items():
        curves[name] = train(model, cfg, data, name, bar=bar)
    table = {f"{name} (trained)": evaluate(m, cfg, data[1]) for name, m in models.items() if name != "float"}
    table.update({name: evaluate(m, cfg, data[1]) for name, m in ptq_models(models["float"], cfg, sample).items()})
    return table, curves, models, data


# ---- timing -------------------------------------------------------------------------------------


def time_inference(ways, cfg, reps=20, batch=16, length=1024, decode_batches=(1, 16, 64)):
    """{way: tokens/s of prefill (batch x length) and of one decode step (length cached, the caches
    donated)} on this device (device time: lm.device_seconds)."""
    hd = cfg.d // cfg.heads
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (batch, length)), jnp.int32)
    out = {}
    for name, model in ways.items():
        graph, state = nnx.split(model)
        prefill = lambda s, t: nnx.merge(graph, s)(t)
        decode = lambda s, t, c: nnx.merge(graph, s)(t, c, length)
        out[name] = dict(prefill=batch * length / lm.device_seconds(prefill, (state, tokens), reps))
        for b in decode_batches:
            cache = lambda: jnp.zeros((b, length + 1, cfg.kv_heads, hd), BF16)
            caches = [(cache(), cache()) for _ in range(cfg.layers)]
            step = jnp.asarray(rng.integers(0, 256, (b, 1)), jnp.int32)
            out[name][f"decode_{b}"] = b / lm.device_seconds(decode, (state, step, caches), reps, carry=2)
    return out


def time_train_steps(cfg, data, sample, reps=20):
    """Device µs of one train step: float and each QT provider's, from the same initialization."""
    opt = lm.optimizer(cfg)
    batch = lm.windows(data[0], np.random.default_rng(0), cfg.batch, cfg.seq)
    models = {"float": Llama(cfg)}
    models.update({f"QT {who}": quantize(Llama(cfg), qt, qt_rules(), sample) for who, (_, qt) in PROVIDERS.items()})
    out = {}
    for name, model in models.items():
        step, params = train_step(model, opt)
        out[name] = 1e6 * lm.device_seconds(step, (params, opt.init(params), batch), reps)
    return out


def time_all(cfg, model, data, sample, log):
    """QT train steps against float's, then PTQ prefill and decode against float, of `model` at `cfg`."""
    steps = time_train_steps(cfg, data, sample)
    log(f"d={cfg.d} train step µs: " + ", ".join(f"{k} {v:.0f} ({steps['float'] / v:.2f}x)" for k, v in steps.items()))
    speed = time_inference(ptq_models(model, cfg, sample), cfg)
    for name, s in speed.items():
        rates = "  ".join(f"{k.replace('_', ' b')} {v:>10,.0f}" for k, v in s.items())
        log(f"d={cfg.d} {name:<18} tok/s: {rates}")
    return dict(train_step_us=steps, tokens_per_s=speed)


class FFNBlock(nnx.Module):
    """x + SwiGLU(rms_norm(x)): the issue's stack block."""

    def __init__(self, cfg, rngs):
        self.norm = nnx.RMSNorm(cfg.d, epsilon=1e-6, dtype=cfg.dtype, param_dtype=BF16, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs, 1.0)

    def __call__(self, x):
        return x + self.mlp(self.norm(x))


class Stack(nnx.Module):
    def __init__(self, cfg, seed=0):
        rngs = nnx.Rngs(seed)
        self.blocks = nnx.List([FFNBlock(cfg, rngs) for _ in range(cfg.layers)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def time_stack(tokens=(16, 256, 4096), d=4096, ffn=14336, blocks=4, reps=20, log=print):
    """Device µs of a jitted forward of `blocks` SwiGLU blocks (bf16 weights), bf16 and each PTQ
    provider's int8 and float8 (at each token count); and of a train step (value_and_grad of the mean
    square output) at the last count, bf16 and each QT provider's."""
    cfg = Config(d=d, ffn=ffn, layers=blocks)
    x_of = lambda t: jax.random.normal(jax.random.key(1), (1, t, d), F32).astype(BF16)
    model = served(Stack(cfg), BF16)
    ways = {"bf16": model}
    for fmt in (I8, F8):
        for who, (ptq, _) in PROVIDERS.items():
            ways[f"{who} {jnp.dtype(fmt).name}"] = quantize(model, ptq, ptq_rules(fmt), x_of(16))
    forward = {str(t): {} for t in tokens}
    for name, m in ways.items():
        graph, state = nnx.split(m)
        for t in tokens:
            us = 1e6 * lm.device_seconds(lambda s, x: nnx.merge(graph, s)(x), (state, x_of(t)), reps)
            forward[str(t)][name] = us
        log(f"stack forward {name:<18} µs: " + "  ".join(f"{t} tok {forward[str(t)][name]:>8.1f}" for t in tokens))
    train, trained = {}, {"bf16": model}
    trained.update({f"QT {who}": quantize(model, qt, qt_rules(), x_of(16)) for who, (_, qt) in PROVIDERS.items()})
    for name, m in trained.items():
        graph, params, rest = nnx.split(m, nnx.Param, ...)
        loss = lambda p, x: jnp.mean(jnp.square(nnx.merge(graph, p, rest)(x).astype(F32)))
        train[name] = 1e6 * lm.device_seconds(jax.value_and_grad(loss), (params, x_of(tokens[-1])), reps)
        log(f"stack train step {name:<10} at {tokens[-1]} tokens µs: {train[name]:.0f}")
    return dict(config=dict(d=d, ffn=ffn, blocks=blocks), forward_us=forward, train_step_us=train)


# ---- the report ---------------------------------------------------------------------------------


def summary(table):
    """Each of our validation losses against qwix's provider's (%), the targets' figure."""
    pairs = [(f"ours {f}", f"qwix {f}") for f in ("int8", "float8_e4m3fn")] + [
        ("QT ours (trained)", "QT qwix (trained)")
    ]
    return {f"{a} vs {b} %": 100 * (table[a] / table[b] - 1) for a, b in pairs}


def markdown(result):
    """The docs' tables (docs/qwix.md) from a result: validation losses, and what was timed."""
    lines = ["| model | val bpb | vs qwix's provider |", "|---|---:|---:|"]
    for name, loss in result["table"].items():
        twin = name.replace("ours", "qwix") if "ours" in name else None
        against = f"{100 * (loss / result['table'][twin] - 1):+.2f} %" if twin else ""
        lines.append(f"| {name} | {loss / math.log(2):.4f} | {against} |")
    for key in ("timing", "timing_wide"):
        if key in result:
            t = result[key]
            steps, speed = t["train_step_us"], t["tokens_per_s"]
            lines += ["", f"D {t['d']}: train step, device µs", "", "| | µs | × float |", "|---|---:|---:|"]
            lines += [f"| {k} | {v:.0f} | {steps['float'] / v:.2f}× |" for k, v in steps.items()]
            kinds = list(speed["float"])
            lines += ["", f"D {t['d']}: tokens/s (× float)", "", "| | " + " | ".join(kinds) + " |"]
            lines += ["|---|" + "---:|" * len(kinds)]
            for way, s in speed.items():
                cells = " | ".join(f"{s[k]:,.0f} ({s[k] / speed['float'][k]:.2f}×)" for k in kinds)
                lines.append(f"| {way} | {cells} |")
    if "stack" in result:
        fwd, train = result["stack"]["forward_us"], result["stack"]["train_step_us"]
        ways = list(next(iter(fwd.values())))
        lines += ["", "SwiGLU stack forward, device µs (× bf16)", "", "| tokens | " + " | ".join(ways) + " |"]
        lines += ["|---|" + "---:|" * len(ways)]
        for t, row in fwd.items():
            lines.append(f"| {t} | " + " | ".join(f"{row[w]:.0f} ({row['bf16'] / row[w]:.2f}×)" for w in ways) + " |")
        lines += ["", "| train step | " + " | ".join(train) + " |", "|---|" + "---:|" * len(train)]
        lines.append(
            "| µs (× bf16) | " + " | ".join(f"{v:.0f} ({train['bf16'] / v:.2f}×)" for v in train.values()) + " |"
        )
    return "\n".join(lines)


def plot(curves, timing, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if timing else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 3.8), squeeze=False)
    ax = axes[0, 0]
    for name, losses in curves.items():
        k = max(1, len(losses) // 50)
        ax.plot(np.convolve(losses, np.ones(k) / k, mode="valid"), label=name)
    ax.set(xlabel="step", ylabel="train loss (nats / byte)", title="Flax NNX Llama on the stdlib: float and QT")
    lowest = min(float(np.min(losses)) for losses in curves.values())
    ax.set_ylim(top=max(min(3.0, ax.get_ylim()[1]), lowest + 0.5))  # the curves' tails, where they differ
    ax.grid(alpha=0.3)
    ax.legend()
    if timing:
        ax = axes[0, 1]
        speed = timing["tokens_per_s"]
        kinds = list(speed["float"])
        ways = [w for w in speed if w != "float"]
        for i, way in enumerate(ways):
            ratios = [speed[way][k] / speed["float"][k] for k in kinds]
            ax.bar(
                np.arange(len(kinds)) + (i - len(ways) / 2 + 0.5) * 0.8 / len(ways), ratios, 0.8 / len(ways), label=way
            )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(kinds)), [k.replace("_", " b") for k in kinds])
        ax.set(ylabel="tokens/s over float (bf16)", title=f"PTQ, d={timing['d']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def versions():
    import flax

    return dict(jax=jax.__version__, flax=flax.__version__, qwix=qwix.__version__)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=Config.steps)
    p.add_argument("--tiny", action="store_true", help="the test suite's configuration")
    p.add_argument("--set", default="", help="Config fields to override, e.g. d=256,layers=2,dtype=float32")
    p.add_argument("--time", action="store_true", help="train-step and PTQ prefill/decode timing (meant for a GPU)")
    p.add_argument("--wide", action="store_true", help="with --time: also at D 2048 (untrained)")
    p.add_argument("--stack", action="store_true", help="time the 4-block SwiGLU stack of D 4096 (a GPU)")
    p.add_argument("--png", default=None, help="save the loss curves (and the PTQ speed-ups) here")
    p.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    cfg = TINY if args.tiny else dataclasses.replace(Config(), steps=args.steps)
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    overrides = dict(kv.split("=") for kv in args.set.split(",") if kv)
    cfg = dataclasses.replace(cfg, **{k: types[k](v) for k, v in overrides.items()})
    log = lambda s: print(s, flush=True)
    result = dict(device=jax.devices()[0].device_kind, versions=versions(), config=dataclasses.asdict(cfg))
    save = lambda: args.json.write_text(json.dumps(result, indent=1)) if args.json else None
    if args.stack:
        result["stack"] = time_stack(log=log)
        save()
    table, curves, models, data = run(cfg, bar=not args.tiny)
    result.update(table=table, summary=summary(table))
    result["final_train_loss"] = {name: float(np.mean(losses[-50:])) for name, losses in curves.items()}
    log(f"\n{result['device']}, {cfg}\n{'model':<26} {'val bpb':>8}")
    for name, loss in table.items():
        log(f"{name:<26} {loss / math.log(2):>8.4f}")
    for k, v in result["summary"].items():
        log(f"{k:<44} {v:+.2f}")
    save()
    figure = lambda timing=None: plot(curves, timing, args.png) if args.png else None
    figure()  # after each part, as the JSON: a run cut short keeps what it measured
    if args.time:
        sample = lm.windows(data[0], np.random.default_rng(0), 2, cfg.seq)[:, :-1]
        result["timing"] = dict(d=cfg.d, **time_all(cfg, models["float"], data, sample, log))
        save()
        figure(result["timing"])
        if args.wide:
            wide = dataclasses.replace(cfg, **WIDE)
            result["timing_wide"] = dict(d=wide.d, **time_all(wide, Llama(wide), data, sample, log))
            save()
            figure(result["timing_wide"])
    log("\n" + markdown(result))
    return result


if __name__ == "__main__":
    main()
