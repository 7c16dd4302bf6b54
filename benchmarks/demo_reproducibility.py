"""Is the demo base model's build the same bit for bit under another thread count or another CPU instruction set?

    python benchmarks/demo_reproducibility.py [--epochs 1]

Builds the demo model (conf/model/demo.yaml's settings, `--epochs` of its 50 epochs: 1 epoch is 20 optimizer steps,
about a minute on 2 cores) in a fresh process per setting, and prints each build's final training loss and the
SHA-256 of its weights side by side with the reference (this machine's default: every core, the widest SIMD torch
finds). The settings:

- torch threads 1, 2 and 4 (`torch.set_num_threads`): a machine with more or fewer cores;
- `ATEN_CPU_CAPABILITY=avx2` and `=default`: torch's kernels for a CPU without AVX-512, and without SIMD at all
  (torch reads the variable when it starts; a value above what the CPU has is ignored). This stands in for another
  machine's CPU; it does not change MKL's own matrix-multiply kernels, which may differ between CPUs as well.

The tokenizer's BPE training is single-threaded in the pipeline (TOKENIZERS_PARALLELISM=false), so it is not varied.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child process: build, then hash the weights in a fixed order.
CHILD = """
import dataclasses, hashlib, json, sys, torch
import pipeline
from pipeline.core.config import DemoBuildConfig
from pipeline.demo_model import build_demo_model
from safetensors.torch import load_file
out, epochs, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
build_demo_model(dataclasses.replace(DemoBuildConfig(), num_epochs=epochs), out, max_seq_length=128)
w = load_file(out + "/model.safetensors")
print(json.dumps({"sha": hashlib.sha256(b"".join(w[k].numpy().tobytes() for k in sorted(w))).hexdigest()[:16],
                  "loss": json.load(open(out + "/demo_build.json"))["train_loss"],
                  "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability()}))
"""

SETTINGS = [("reference (default threads, widest SIMD)", 0, {}),
            ("1 thread", 1, {}), ("2 threads", 2, {}), ("4 threads", 4, {}),
            ("ATEN_CPU_CAPABILITY=avx2", 0, {"ATEN_CPU_CAPABILITY": "avx2"}),
            ("ATEN_CPU_CAPABILITY=default (no SIMD)", 0, {"ATEN_CPU_CAPABILITY": "default"})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    rows = []
    for name, threads, env in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            out = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "m"), str(args.epochs), str(threads)],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=True,
                                 capture_output=True, text=True).stdout
            rows.append((name, json.loads(out.strip().splitlines()[-1]), time.time() - t0))
    ref = rows[0][1]
    print(f"{'setting':42} {'threads':>7} {'SIMD':>8} {'final loss':>20} {'weights sha256':>17} {'same':>5} {'wall':>6}")
    for name, r, wall in rows:
        print(f"{name:42} {r['threads']:>7} {r['cpu']:>8} {r['loss']:>20.15f} {r['sha']:>17} "
              f"{'yes' if r['sha'] == ref['sha'] else 'NO':>5} {wall:>5.0f}s")


if __name__ == "__main__":
    main()
