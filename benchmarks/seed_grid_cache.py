"""The seed's grid (8 cells) on the demo, with the stage cache and with caching disabled, in one invocation.

    python benchmarks/seed_grid_cache.py            # the real grid: ~20-25 minutes on 2 CPU cores
    python benchmarks/seed_grid_cache.py --quick    # cpt.num_epochs=10: a few minutes, same shape

Prints both wall times and their ratio (target: cached >= 3x faster), and how many CPT stages were built. The demo
base model is built first and not timed. Both sweeps write into a fresh temporary directory (and a fresh cache).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(sweep_dir: Path, extra: list) -> float:
    cmd = [sys.executable, "-m", "pipeline.run", "-m", "+experiment=seed_grid", f"hydra.sweep.dir={sweep_dir}",
           *extra]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sweep failed ({' '.join(cmd[2:])}):\n{r.stderr[-3000:]}")
    return time.time() - t0


def cpt_builds(sweep_dir: Path) -> str:
    status = [json.loads((d / "metrics.json").read_text())["stage/cpt"] for d in sorted(sweep_dir.iterdir())
              if (d / "metrics.json").is_file()]
    return f"{status.count('built')} CPT built, {status.count('reused')} reused, {len(status)} jobs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="cpt.num_epochs=10 for a fast check")
    args = parser.parse_args()
    extra = ["cpt.num_epochs=10"] if args.quick else []
    subprocess.run([sys.executable, "-m", "pipeline.demo_model"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory(prefix="seed_grid_bench_") as tmp:
        tmp = Path(tmp)
        uncached = sweep(tmp / "uncached", ["cache.enabled=false", *extra])
        print(f"uncached: {uncached:7.1f} s  ({cpt_builds(tmp / 'uncached')})", flush=True)
        cached = sweep(tmp / "cached", [f"cache.dir={tmp / 'cache'}", *extra])
        print(f"cached:   {cached:7.1f} s  ({cpt_builds(tmp / 'cached')})")
        print(f"speed-up: {uncached / cached:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
