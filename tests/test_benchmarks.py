"""bench.py in a CI-sized form: it runs under whichever jax the suite runs on (the CPU tables come
from it, on jax 0.10.2 and 0.12.x), on one small shape, in a fresh process."""

import json
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def run(script, *args):
    cmd = [sys.executable, str(BENCHMARKS / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)


def test_bench_times_every_op(tmp_path):
    out = tmp_path / "bench.json"
    run("bench.py", "--shapes", "2x256", "--reps", "1", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 * 7  # two formats, seven ops
    assert all(r["us_ours"] > 0 and r["us_jnp"] > 0 for r in results)
