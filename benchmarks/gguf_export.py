"""GGUF export of a checkpoint, per type: file size, time, and the verification's figures side by side.

    python benchmarks/gguf_export.py outputs/smollm2-135m-instruct            # f16 and q8_0
    python benchmarks/gguf_export.py outputs/demo_base_model --types f16      # the demo: refused (its tokenizer)

Runs the export stage's GGUF step (pipeline/core/gguf_export.py: llama.cpp's converter from export.llama_cpp, then
the read-back, the tokenizer round trip on the QA set's questions and the logit comparison) on the checkpoint as it
is, into a temporary directory, and prints one row per type: size (and its ratio to the safetensors checkpoint's),
conversion seconds, max and mean |Δlogit| against the safetensors checkpoint, the tolerance, top-1 agreement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402,F401  (the offline environment first)


def main() -> int:
    from pipeline.core.checkpoints import load_tokenizer
    from pipeline.core.config import ExportConfig
    from pipeline.core.data import load_qa
    from pipeline.core.devices import resolve_device
    from pipeline.core.gguf_export import export_gguf
    from pipeline.core.outputs import PipelineError

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--llama-cpp", default=ExportConfig.llama_cpp)
    parser.add_argument("--qa", default="eval_sets/qa.jsonl")
    args = parser.parse_args()
    cfg = ExportConfig(gguf=args.types.split(","), llama_cpp=args.llama_cpp)
    tok = load_tokenizer(args.model_dir)
    questions = [q.question for q in load_qa(args.qa)]
    safetensors = sum(f.stat().st_size for f in args.model_dir.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        try:
            records = export_gguf(cfg, args.model_dir, Path(tmp) / "gguf", tok, questions, resolve_device("cpu"))
        except PipelineError as e:
            print(f"refused after {time.time() - t0:.0f}s: {e}")
            return 2
    print(f"{args.model_dir}: safetensors {safetensors / 1e6:.1f} MB; {len(questions)} questions round-tripped")
    print("| type | size | vs safetensors | convert s | max abs dlogit | mean abs dlogit | max abs logit | tolerance "
          "| top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        lg = r["logits"]
        if isinstance(lg, str):  # transformers cannot load this architecture from GGUF
            print(f"| {r['type']} | {r['bytes'] / 1e6:.1f} MB | {r['bytes'] / safetensors:.2f}x | {r['seconds']:.1f} | "
                  f"{lg} |")
            continue
        print(f"| {r['type']} | {r['bytes'] / 1e6:.1f} MB | {r['bytes'] / safetensors:.2f}x | {r['seconds']:.1f} | "
              f"{lg['max_abs_logit_diff']:.3g} | {lg['mean_abs_logit_diff']:.3g} | {lg['max_abs_logit']:.1f} | "
              f"{lg['tolerance']:.3g} | {lg['top1_agreement']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
