"""Dynamic quantization of x sharded along D: the all-gather that the partitioning rule makes XLA
insert, against local row ranges combined with pmin/pmax and a static quantize of each shard.

    python benchmarks/d_sharded_dynamic.py [--devices 4] [--shape 1024 8192]

Both give the same bits (checked here); the second moves 8 bytes a row between devices instead of
the (k-1)/k of x that a gather brings to each device.
"""

import argparse

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from timing import time_per_call


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=4, help="host devices to make when running on a CPU")
    p.add_argument("--shape", type=int, nargs=2, default=(1024, 8192))
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", args.devices)

    import baracuda_jax as bj
    from baracuda_jax.reference import _dynamic_qparams

    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    spec = P(None, "d")

    def local_range(x):
        m = jnp.float32
        xm = jnp.where(jnp.isnan(x), 0, x).astype(m)
        lo = jax.lax.pmin(jnp.min(xm, axis=-1, initial=0), "d")
        hi = jax.lax.pmax(jnp.max(xm, axis=-1, initial=0), "d")
        # the rows' ranges as two-element rows: the contract's qparams of [lo, hi] are those of x
        s, _ = _dynamic_qparams(jnp.stack([lo, hi], axis=-1), True, -128, 127)
        return bj.quantize_per_token(x, s), s

    ways = {
        "gather (the rule)": lambda x: bj.quantize_per_token_dynamic(x)[:2],
        "local range + pmax": jax.shard_map(local_range, mesh=mesh, in_specs=spec, out_specs=(spec, P())),
    }
    x = jax.device_put(jax.random.normal(jax.random.key(0), args.shape, jnp.bfloat16), NamedSharding(mesh, spec))
    outs = [jax.jit(f)(x) for f in ways.values()]
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(*outs))
    print(f"{jax.devices()[0].device_kind} x{len(jax.devices())}, x {args.shape} bf16 sharded along D; "
          f"same bits: {same}")
    for name, f in ways.items():
        print(f"  {name:<20} {time_per_call(f, [(x,)], args.reps) * 1e6:10.1f} us")


if __name__ == "__main__":
    main()
