"""Stage chat_vector — add an instruct model's "chat vector" to the CPT model (Chat Vector, arXiv 2310.04799).

    python -m pipeline.run 'stages=[cpt,merge,chat_vector,eval]'       # instead of SFT
    python -m pipeline.run 'stages=[cpt,merge,chat_vector,sft,eval]'   # SFT trains on top of it

The output is CPT model + chat_vector.ratio x (instruct - base), tensor by tensor, where base is model.path (the
model CPT started from) and instruct is model.instruct_path, an instruct checkpoint of the same family. The paper's
claim is that the difference an instruct model's chat training made to its base transfers to a continually
pretrained copy of that base, so the CPT model follows instructions without an SFT that could overwrite what CPT
taught. Eval scores the result in SFT's place (`sft/...`, asked through the chat template), so retention and the
sweep table compare it with SFT directly; the `cpt` row stays the CPT model itself.

Embeddings and head: the reference code (github.com/aqweteddy/ChatVector, add_chat_vector.py) adds the vector to
every parameter, embed_tokens and lm_head included, when the shapes match, and skips both with its --skip_embed for
a CPT model with an extended vocabulary. Here: chat_vector.skip_embeddings=true skips both; otherwise the rows that
base, instruct and CPT model all have get the vector, and rows only the CPT model has (tokens it added,
model.add_special_tokens) keep the values CPT trained, since no instruct row exists for them. (The reference code's
special_tokens_map, which writes chosen rows from another table, is not reproduced.)

Memory: the three checkpoints are read with safetensors one tensor at a time (memory-mapped), and the output is
written in shards, so the stage never holds a model in memory until the final load check. The arithmetic is done in
float32 and stored in the CPT model's dtype. Verified like the merge: after saving, every stored tensor is compared
with the arithmetic recomputed from the inputs (must be identical), and the output must load with plain transformers
(same tied/untied embeddings, finite logits) before it is published.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from pipeline.core.lineage import write_lineage
from pipeline.core.outputs import PipelineError, atomic_output, write_json
from pipeline.core.checkpoints import check_model_dir, declared_tied, load_tokenizer
from pipeline.core.config import ChatVectorConfig, ModelConfig, cache_settings

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024 ** 3  # output shard size: bounds the memory the stage needs for writing
INDEX_FILE = "model.safetensors.index.json"
# What describes a checkpoint without being its weights: copied from the CPT model (tokenizer, config, templates).
NOT_COPIED = {INDEX_FILE, "merge_check.json", ".complete"}


def tensor_files(model_dir: str | Path) -> Dict[str, Path]:
    """{tensor name: the .safetensors file holding it} for a (possibly sharded) checkpoint directory."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / f for name, f in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PipelineError(f"{model_dir}: no .safetensors weights (the chat vector reads safetensors only)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({name: f for name in h.keys()})
    return out


class _Reader:
    """Tensors of one checkpoint by name, each read on demand from its memory-mapped file."""

    def __init__(self, model_dir, stack: ExitStack):
        from safetensors import safe_open

        self.files = tensor_files(model_dir)
        self._handles = {f: stack.enter_context(safe_open(str(f), framework="pt"))
                         for f in sorted(set(self.files.values()))}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.files[name]].get_tensor(name)


def _is_embedding(name: str) -> bool:
    """Whether a tensor belongs to the embedding or the head (embed_tokens, lm_head and the other families' names)."""
    from pipeline.core.modules import EMBED_NAMES

    return any(part in EMBED_NAMES for part in name.split(".")[:-1])


def chat_vector_tensor(name: str, cpt: torch.Tensor, base: torch.Tensor, instruct: torch.Tensor, ratio: float,
                       skip_embeddings: bool) -> Tuple[torch.Tensor, str]:
    """One output tensor and what was done to it: "added", "skipped" (embeddings with skip_embeddings, or a tensor
    that is not floating point), or "rows:<n>" (the vector added to the first n rows, the rest kept)."""
    if not cpt.is_floating_point():
        return cpt, "skipped"
    embedding = _is_embedding(name)
    if embedding and skip_embeddings:
        return cpt, "skipped"
    if cpt.shape == base.shape == instruct.shape:
        return (cpt.float() + ratio * (instruct.float() - base.float())).to(cpt.dtype), "added"
    rows = min(cpt.shape[0], base.shape[0], instruct.shape[0])
    if embedding and cpt.shape[1:] == base.shape[1:] == instruct.shape[1:]:
        out = cpt.clone()
        out[:rows] = (cpt[:rows].float() + ratio * (instruct[:rows].float() - base[:rows].float())).to(cpt.dtype)
        return out, f"rows:{rows}"
    raise PipelineError(f"chat vector: tensor {name} has shape {tuple(cpt.shape)} in the CPT model, "
                        f"{tuple(base.shape)} in model.path and {tuple(instruct.shape)} in model.instruct_path: "
                        f"model.instruct_path must be an instruct checkpoint of model.path's family and size")


def _check_family(model_cfg: ModelConfig) -> None:
    """The instruct checkpoint must have the base's architecture (the tensors are checked one by one later)."""
    base, inst = check_model_dir(model_cfg.path), check_model_dir(model_cfg.instruct_path, key="model.instruct_path")
    for k in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads"):
        if base.get(k) != inst.get(k):
            raise PipelineError(f"model.instruct_path={model_cfg.instruct_path}: {k}={inst.get(k)} but model.path "
                                f"has {k}={base.get(k)}; the chat vector needs an instruct checkpoint of the same "
                                f"family and size")


def check_instruct(model_cfg: ModelConfig) -> None:
    """For run.validate: model.instruct_path is set and is a checkpoint of model.path's family."""
    if not model_cfg.instruct_path:
        raise PipelineError("stage chat_vector needs model.instruct_path (an instruct checkpoint of model.path's "
                            "family, e.g. its -instruct sibling)")
    _check_family(model_cfg)


def _write_shards(tensors: Iterator[Tuple[str, torch.Tensor]], out_dir: Path) -> Dict[str, str]:
    """Save (name, tensor) pairs into shards of at most SHARD_BYTES, each written as soon as it is full (the shard
    count is known only at the end, so they are renamed to model-0000i-of-0000n.safetensors then, with an index);
    one shard is plain model.safetensors. Returns the weight map."""
    from safetensors.torch import save_file

    written, current, size = [], {}, 0  # written: (temporary file name, its tensor names, its bytes)

    def flush():
        nonlocal current, size
        name = f"shard-{len(written) + 1:05d}.tmp"
        save_file(current, str(out_dir / name), metadata={"format": "pt"})
        written.append((name, list(current), size))
        current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            flush()
        current[name] = t.contiguous()
        size += nbytes
    if current or not written:
        flush()
    weight_map, n = {}, len(written)
    for i, (tmp_name, names, _) in enumerate(written, 1):
        final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        (out_dir / tmp_name).rename(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    if n > 1:
        write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": sum(w[2] for w in written)},
                                         "weight_map": weight_map})
    return weight_map


def key_material(cfg: ChatVectorConfig, model_cfg: ModelConfig) -> dict:
    """What the chat-vector model depends on besides the CPT model (run.py adds it and the base): the settings and
    the instruct checkpoint read here."""
    from pipeline.cache import fingerprint_model

    return {"chat_vector": cache_settings(cfg), "instruct": fingerprint_model(model_cfg.instruct_path)}


def apply_chat_vector(cfg: ChatVectorConfig, model_cfg: ModelConfig, cpt_model_dir: str | Path,
                      out_dir: str | Path, device: str = "auto") -> Path:
    """Write CPT model + cfg.ratio x (instruct - base) to `out_dir` (verified, atomic); returns `out_dir`."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.modules import is_tied
    from pipeline.core.prompts import apply_chat_template_override, write_prompt_format

    t0 = time.time()
    out_dir = Path(out_dir)
    check_instruct(model_cfg)
    cpt_model_dir = Path(cpt_model_dir)
    with atomic_output(out_dir) as tmp, ExitStack() as stack:
        cpt, base = _Reader(cpt_model_dir, stack), _Reader(model_cfg.path, stack)
        instruct = _Reader(model_cfg.instruct_path, stack)
        for name in cpt.files:
            for reader, key in ((base, "model.path"), (instruct, "model.instruct_path")):
                if name not in reader:
                    raise PipelineError(f"chat vector: tensor {name} of the CPT model is missing in {key}="
                                        f"{model_cfg.path if reader is base else model_cfg.instruct_path}: not the "
                                        f"same architecture (or tied vs untied embeddings)")
        done: Dict[str, str] = {}

        def outputs():  # one tensor of each checkpoint in memory at a time (plus the shard being filled)
            for name in cpt.files:
                t, what = chat_vector_tensor(name, cpt.get(name), base.get(name), instruct.get(name), cfg.ratio,
                                             cfg.skip_embeddings)
                done[name] = what
                yield name, t

        _write_shards(outputs(), tmp)
        # Verify: every stored tensor equals the arithmetic recomputed from the three inputs.
        saved = _Reader(tmp, stack)
        for name in cpt.files:
            expected, _ = chat_vector_tensor(name, cpt.get(name), base.get(name), instruct.get(name), cfg.ratio,
                                             cfg.skip_embeddings)
            got = saved.get(name)
            if got.dtype != expected.dtype or not torch.equal(got, expected):
                raise PipelineError(f"chat vector check failed: stored tensor {name} differs from CPT + "
                                    f"{cfg.ratio:g} x (instruct - base); nothing was published")
        for f in cpt_model_dir.iterdir():  # config, generation config, tokenizer, chat template
            if f.is_file() and f.suffix != ".safetensors" and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        tok = load_tokenizer(cpt_model_dir, model_cfg.trust_remote_code)
        apply_chat_template_override(tok, model_cfg)  # eval asks this model through its chat template, as SFT's
        tok.save_pretrained(tmp)
        write_prompt_format(tmp, tok, model_cfg.prompt_template)
        # The output loads with plain transformers, keeps the CPT model's tied/untied embeddings, gives finite logits.
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, use_safetensors=True,
                                                      trust_remote_code=model_cfg.trust_remote_code).eval()
        tied = declared_tied(cpt_model_dir)
        if tied is not None and is_tied(loaded) != tied:
            raise PipelineError("chat vector check failed: the saved model's embeddings are not tied as the CPT "
                                "model's are; nothing was published")
        ids = torch.tensor([tok("検証用の固定サンプル: 設定値は880トン。")["input_ids"]])
        with torch.no_grad():
            finite = bool(torch.isfinite(loaded(input_ids=ids).logits).all())
        if not finite:
            raise PipelineError(f"chat vector check failed: the model gives non-finite logits (ratio {cfg.ratio:g}); "
                                f"nothing was published")
        del loaded
        counts = {k: sum(1 for v in done.values() if v.split(":")[0] == k) for k in ("added", "skipped", "rows")}
        report = {"ratio": cfg.ratio, "skip_embeddings": cfg.skip_embeddings, "cpt_model": str(cpt_model_dir),
                  "base": str(model_cfg.path), "instruct": str(model_cfg.instruct_path), "tensors": len(done),
                  "tensors_added": counts["added"], "tensors_skipped": counts["skipped"],
                  "tensors_partial_rows": {k: int(v.split(":")[1]) for k, v in done.items() if v.startswith("rows:")},
                  "skipped": sorted(k for k, v in done.items() if v == "skipped"), "verified": True,
                  "seconds": round(time.time() - t0, 2)}
        write_json(tmp / "chat_vector.json", report)
        write_lineage(tmp, "chat_vector_model", model_cfg.path, parent=cpt_model_dir)
    log.info("chat vector: CPT model + %g x (instruct - base) on %d of %d tensors (%d skipped, %d on their shared "
             "rows only); stored weights verified tensor by tensor; loads with transformers (%.1fs)", cfg.ratio,
             counts["added"] + counts["rows"], len(done), counts["skipped"], counts["rows"], time.time() - t0)
    return out_dir
