"""GGUF files of an exported checkpoint, made by llama.cpp's own converter and verified.

The converter (convert_hf_to_gguf.py with its conversion/ package and gguf-py/) is not on the package index as a
package: PyPI's `gguf` is only the reader and writer. It comes from an existing llama.cpp checkout, or from the copy
llama-cpp-python's source distribution vendors, which `make gguf-converter` unpacks into .venv/llama.cpp at install
time (README, "Running your model"). Nothing is fetched at run time: export.llama_cpp must point at it.

f16 and q8_0 are written by the converter itself; any other llama.cpp type (q4_k_m, ...) is made from the f16 file
by llama.cpp's llama-quantize binary, refused with one line when it is not there.

Every file is checked before the stage publishes it:
- read back with the `gguf` reader: the architecture, block count, embedding length and vocabulary size are the
  checkpoint's; every tensor of the checkpoint is in the file under llama.cpp's name for it (gguf's own name map) with
  its shape; the EOS id and the chat template are the export's;
- the tokenizer, rebuilt by transformers from the file's vocabulary, encodes the QA set's questions to the same ids as
  the checkpoint's tokenizer and decodes them back to the same text;
- where transformers can load the architecture from GGUF (it dequantizes to float32), the logits on the merge check's
  sample must match the safetensors checkpoint's within the type's tolerance (LOGIT_TOLERANCE), same top-1 token on
  at least TOP1_AGREEMENT of the positions.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from pipeline.core.outputs import PipelineError

log = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
DIRECT_TYPES = ("f16", "q8_0")  # written by the converter itself
# llama-quantize's types (its --help); made from the f16 file.
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
                  "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
# max |Δlogit| allowed, as a share of max |logit| on the check sample, between a GGUF file dequantized by transformers
# and the safetensors checkpoint, and the share of positions that must keep their top-1 token. f16 rounds every weight
# to 11 significant bits; q8_0 stores blocks of 32 weights as int8 with one f16 scale; k-quants lose more. Measured on
# SmolLM2-135M-Instruct (README "Running your model"): f16 0.09% of max |logit|, top-1 99.4%; q8_0 3.1%, 95.6%. A
# broken conversion (a wrong q/k permutation, a shifted vocabulary) is off by the logits' own size.
LOGIT_TOLERANCE = {"f16": 0.01, "q8_0": 0.08}
QUANTIZED_TOLERANCE = 0.25
TOP1_AGREEMENT = {"f16": 0.95, "q8_0": 0.85}


def converter_files(llama_cpp: str) -> List[Path]:
    """The converter's code (what its output depends on); [] where there is none."""
    root = Path(llama_cpp)
    files = [root / CONVERTER] + sorted((root / "conversion").glob("*.py")) + sorted((root / "gguf-py" / "gguf")
                                                                                     .glob("*.py"))
    return [f for f in files if f.is_file()]


def find_quantize(cfg) -> Optional[str]:
    if cfg.llama_quantize:
        return cfg.llama_quantize if Path(cfg.llama_quantize).is_file() else None
    built = Path(cfg.llama_cpp) / "build" / "bin" / "llama-quantize"
    return str(built) if built.is_file() else shutil.which("llama-quantize")


def check_request(cfg) -> None:
    """export.gguf's types, the converter and what it imports, llama-quantize where needed: one line each, before any
    model loads."""
    unknown = [t for t in cfg.gguf if t not in DIRECT_TYPES + QUANTIZE_TYPES]
    if unknown:
        raise PipelineError(f"export.gguf: unknown type {unknown[0]!r}; use {', '.join(DIRECT_TYPES)} (llama.cpp's "
                            f"converter) or {', '.join(QUANTIZE_TYPES)} (llama-quantize)")
    if not (Path(cfg.llama_cpp) / CONVERTER).is_file() or not (Path(cfg.llama_cpp) / "gguf-py").is_dir():
        raise PipelineError(f"export.gguf needs llama.cpp's converter: export.llama_cpp={cfg.llama_cpp} has no "
                            f"{CONVERTER} and gguf-py/; run `make gguf-converter` (unpacks it from llama-cpp-python's "
                            f"source distribution) or set export.llama_cpp to a llama.cpp checkout")
    for module, why in (("sentencepiece", "the converter imports it for Llama-family tokenizers"),
                        ("numpy", "the converter"), ("gguf", "reading the files back")):
        if importlib.util.find_spec(module) is None:
            raise PipelineError(f"export.gguf needs the Python package {module} ({why}): pip install -e \".[gguf]\"")
    needs_quantize = [t for t in cfg.gguf if t in QUANTIZE_TYPES]
    if needs_quantize and not find_quantize(cfg):
        raise PipelineError(f"export.gguf={needs_quantize[0]} needs llama.cpp's llama-quantize binary, which is not "
                            f"there (export.llama_quantize={cfg.llama_quantize}, {cfg.llama_cpp}/build/bin, PATH); "
                            f"build llama.cpp or use f16 / q8_0")


def _run(cmd: List[str], what: str, model_dir: Path) -> float:
    t0 = time.time()
    # The environment is this process's: HF_HUB_OFFLINE and the rest are set (pipeline/__init__.py), so the
    # converter, which loads the tokenizer with transformers, never reaches for a hub either.
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode:
        lines = [x for x in (done.stderr + done.stdout).strip().splitlines() if x.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        if "pre-tokenizer was not recognized" in last:
            last = ("its BPE pre-tokenizer is not one llama.cpp knows: the converter identifies BPE tokenizers by a "
                    "hash of their output on a fixed text, and a tokenizer trained for this model (as the demo's is) "
                    "is not in its list")
        elif "not supported" in last.lower() and "architecture" in last.lower():
            last = f"llama.cpp's converter does not support this architecture ({last.strip()})"
        raise PipelineError(f"export.gguf: {what} failed on {model_dir}: {last}; nothing was published")
    return time.time() - t0


def _field(reader, name: str):
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def check_file(path: Path, model_dir: Path, tok) -> dict:
    """The file's metadata and tensors against the checkpoint (module docstring). Raises PipelineError."""
    import gguf
    from transformers import AutoConfig

    from pipeline.stages.merge import _shapes, base_weight_files

    reader = gguf.GGUFReader(str(path))
    config = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    arch = _field(reader, "general.architecture")
    problems = []
    expected = {f"{arch}.block_count": config.num_hidden_layers, f"{arch}.embedding_length": config.hidden_size,
                "tokenizer.ggml.eos_token_id": tok.eos_token_id}
    for key, want in expected.items():
        if _field(reader, key) != want:
            problems.append(f"{key} = {_field(reader, key)}, the checkpoint's is {want}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else None
    if n_tokens not in (config.vocab_size, len(tok)):
        problems.append(f"{n_tokens} vocabulary entries, the checkpoint has {config.vocab_size} rows")
    if _field(reader, "tokenizer.chat_template") != tok.chat_template:
        problems.append("its tokenizer.chat_template is not the export's chat template")

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    in_file = {t.name: [int(x) for x in reversed(t.shape)] for t in reader.tensors}
    shapes = {}
    for f in set(base_weight_files(model_dir).values()):
        shapes.update({k: s for k, (s, _) in _shapes(f).items()})
    missing = []
    for key, shape in shapes.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or name not in in_file:
            missing.append(f"{key} (as {name})")
        elif in_file[name] != list(shape):
            problems.append(f"{name} has shape {in_file[name]}, {key} has {list(shape)}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the checkpoint are not in the file: {missing[:3]}")
    if problems:
        raise PipelineError(f"export.gguf: {path.name} does not match the checkpoint: {problems[0]}; nothing was "
                            f"published")
    return {"architecture": arch, "tensors": len(reader.tensors), "checkpoint_tensors": len(shapes),
            "pre_tokenizer": _field(reader, "tokenizer.ggml.pre"), "tokenizer_model": _field(reader,
                                                                                               "tokenizer.ggml.model"),
            "vocabulary": n_tokens}


def check_tokenizer(path: Path, tok, questions: Sequence[str]) -> dict:
    """The file's vocabulary, rebuilt as a tokenizer by transformers: same ids and the same text back on every
    question. Raises PipelineError on the first difference."""
    from transformers import AutoTokenizer

    g = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for q in questions:
        want, got = tok(q, add_special_tokens=False)["input_ids"], g(q, add_special_tokens=False)["input_ids"]
        back = g.decode(got, skip_special_tokens=True)
        if got != want or back != q:
            raise PipelineError(f"export.gguf: {path.name}'s tokenizer differs from the checkpoint's on a QA question "
                                f"(ids {got[:8]}... vs {want[:8]}..., decoded back "
                                f"{'un' if back == q else ''}changed); "
                                f"nothing was published")
    return {"questions_round_tripped": len(questions)}


def gguf_loadable(architecture: str) -> bool:
    """Whether transformers can load this architecture from a GGUF file (it dequantizes to float32)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:
        return False
    return architecture in GGUF_CONFIG_MAPPING


@torch.no_grad()
def check_logits(path: Path, gguf_type: str, reference: torch.Tensor, ids: torch.Tensor, dev) -> dict:
    from transformers import AutoModelForCausalLM

    from pipeline.stages.merge import _logits, _release

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).to(dev)
    logits = _logits(model.eval(), ids, dev)
    del model
    _release(dev)
    diff = (logits - reference).abs()
    scale = reference.abs().max().item()
    share = LOGIT_TOLERANCE.get(gguf_type, QUANTIZED_TOLERANCE)
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    out = {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(), "max_abs_logit": scale,
           "tolerance": share * scale, "top1_agreement": top1}
    need_top1 = TOP1_AGREEMENT.get(gguf_type, 0.0)
    if not out["max_abs_logit_diff"] <= out["tolerance"] or top1 < need_top1:
        raise PipelineError(f"export.gguf: {path.name} dequantized gives logits off by {out['max_abs_logit_diff']:.4g} "
                            f"(tolerance {out['tolerance']:.3g} = {share:g} x max|logit| {scale:.1f} for {gguf_type}), "
                            f"same top-1 token on {top1:.1%} (need {need_top1:.0%}); nothing was published")
    return out


def export_gguf(cfg, model_dir: Path, out_dir: Path, tok, questions: Sequence[str], dev) -> List[Dict]:
    """Write and verify each type of export.gguf into `out_dir`; returns one record per file."""
    from pipeline.stages.merge import _load_fp32, _logits, _release, check_sample

    check_request(cfg)
    out_dir.mkdir(parents=True)
    converter = str(Path(cfg.llama_cpp) / CONVERTER)
    ids = check_sample(tok, 128)
    model = _load_fp32(model_dir, dev, False)
    reference = _logits(model, ids, dev)
    del model
    _release(dev)
    records, files = [], {}
    order = [t for t in DIRECT_TYPES if t in cfg.gguf] + [t for t in cfg.gguf if t not in DIRECT_TYPES]
    for gguf_type in order:
        path = out_dir / f"model-{gguf_type}.gguf"
        if gguf_type in DIRECT_TYPES:
            seconds = _run([sys.executable, converter, str(model_dir), "--outfile", str(path), "--outtype",
                            gguf_type], "llama.cpp's converter", model_dir)
        else:
            source = files.get("f16") or out_dir / "model-f16.gguf.tmp"
            if "f16" not in files:
                seconds = _run([sys.executable, converter, str(model_dir), "--outfile", str(source), "--outtype",
                                "f16"], "llama.cpp's converter", model_dir)
            else:
                seconds = 0.0
            seconds += _run([find_quantize(cfg), str(source), str(path), gguf_type.upper()], "llama-quantize",
                            model_dir)
        files[gguf_type] = path
        record = {"type": gguf_type, "file": f"gguf/{path.name}", "bytes": path.stat().st_size,
                  "seconds": round(seconds, 1), **check_file(path, model_dir, tok),
                  **check_tokenizer(path, tok, questions)}
        if gguf_loadable(record["architecture"]):
            record["logits"] = check_logits(path, gguf_type, reference, ids, dev)
        else:
            record["logits"] = f"not compared: transformers cannot load {record['architecture']} from GGUF"
        log.info("export: %s (%.1f MB, %.1fs) verified: %d tensors, %d questions round-tripped, logits %s",
                 path.name, record["bytes"] / 1e6, seconds, record["tensors"], record["questions_round_tripped"],
                 f"max |diff| {record['logits']['max_abs_logit_diff']:.3g}" if isinstance(record["logits"], dict)
                 else "not compared")
        records.append(record)
    for leftover in out_dir.glob("*.tmp"):
        leftover.unlink()
    return records
