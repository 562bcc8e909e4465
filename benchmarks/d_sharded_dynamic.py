"""Dynamic quantization of x sharded along D: the all-gather that the partitioning rule makes XLA
insert under plain jit, against `axis_name=` inside shard_map (local row ranges combined with
pmin/pmax, then a static quantize of each shard).

    python benchmarks/d_sharded_dynamic.py [--devices 4] [--shape 1024 8192]

Both give the same bits (checked here); the second moves 8 bytes a row between devices instead of
the (k-1)/k of x that a gather brings to each device.
"""

import argparse

import jax
import jax.numpy as jnp
from harness import time_per_call
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=4, help="host devices to make when running on a CPU")
    p.add_argument("--shape", type=int, nargs=2, default=(1024, 8192))
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", args.devices)

    import baracuda_jax as bj

    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    spec = P(None, "d")
    ways = {
        "gather (plain jit)": lambda x: bj.quantize_per_token_dynamic(x)[:2],
        "axis_name='d'": jax.shard_map(
            lambda x: bj.quantize_per_token_dynamic(x, axis_name="d")[:2],
            mesh=mesh,
            in_specs=spec,
            out_specs=(spec, P()),
        ),
    }
    x = jax.device_put(jax.random.normal(jax.random.key(0), args.shape, jnp.bfloat16), NamedSharding(mesh, spec))
    outs = [jax.jit(f)(x) for f in ways.values()]
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(*outs))
    print(
        f"{jax.devices()[0].device_kind} x{len(jax.devices())}, x {args.shape} bf16 sharded along D; same bits: {same}"
    )
    for name, f in ways.items():
        print(f"  {name:<20} {time_per_call(f, [(x,)], args.reps) * 1e6:10.1f} us")


if __name__ == "__main__":
    main()
