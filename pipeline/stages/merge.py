"""Stage 2 — merge the CPT adapter into the base model and save a standalone checkpoint (the "CPT model").

    python -m pipeline.run stages=[cpt,merge]

The merge streams: it reads the base checkpoint's safetensors one tensor at a time, applies what the adapter does to
that tensor in float32 (a LoRA update, a full copy trained with modules_to_save, new token rows) and writes the result
in merge.save_dtype into output shards of at most SHARD_BYTES, one shard in memory at a time. No model is built for
it, so it needs memory for one shard, not for the model. It reads the 16/32-bit weights at model.path even when CPT
trained on a 4-bit copy of them (QLoRA; a pre-quantized checkpoint is refused): merging into quantized weights changes
outputs (peft #2321).

Verification, with one model in memory at a time, on the configured device, in float32:
1. base + adapter as PEFT runs it (PeftModel) gives the reference logits on a fixed sample (a text, the tokens CPT
   added and random token ids). PEFT's own merge_and_unload is then applied to that same model in place and must
   reproduce them within merge.max_abs_logit_diff + merge.rel_logit_diff × max|logit|: fp32 rounding grows with the
   logits' size, a broken merge is off by whole units (README, "Merges are verified", has the measured figures). The
   merged weights are then rounded to the save dtype in place; those logits are what the saved file must reproduce,
   and their distance from the reference is reported as the save dtype's drift.
2. The model is freed, the streamed checkpoint is loaded from the output directory (transformers' model class, each
   tensor read from the saved files by name), and its logits must match the rounded merge within the same tolerance,
   with the base's tied/untied embeddings.
So the check runs at fp32 precision and the rounding is reported, not tolerated: a tolerance wide enough for a bf16
save's rounding would also pass a broken merge of a small adapter. LoRA on the head of a tied model is refused (PEFT's
merge writes both deltas into the one shared tensor). Any failure stops the stage and publishes nothing.

When CPT trained on a 4-bit copy of the base (model.load_in_4bit, QLoRA), the logit drift between the 4-bit adapter
model CPT trained and the saved model is measured and reported. When CPT added tokens (model.add_special_tokens),
the base's embedding rows are grown to the adapter's vocabulary the same way CPT grew them (rows at the mean of the
old ones) before the adapter is applied.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from pipeline.core.lineage import write_lineage
from pipeline.core.outputs import PipelineError, atomic_output, write_json
from pipeline.core.checkpoints import is_prequantized, load_model, load_tokenizer
from pipeline.core.devices import resolve_device, resolve_dtype
from pipeline.core.config import MergeConfig, ModelConfig
from pipeline.core.modules import embedding_rows, fit_embeddings, is_tied, meta_model

log = logging.getLogger(__name__)

CHECK_TEXT = "検証用の固定サンプル: The merged model must match the adapter model. 設定値は880トン、温度は45℃。"
# Output shard size. One output shard (in the save dtype) is all the streaming merge holds besides the float32 copy
# of the tensor it is working on, and the verification holds a whole float32 model: at 1 GiB the merge never sets
# the stage's peak, even for llm-jp-3-1.8b (7.5 GB in fp32), while a 13B model still fits in a few dozen files.
# The base's own shard layout is not kept: transformers 5 saves up to 50 GB in one file by default.
SHARD_BYTES = 1 << 30
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def check_sample(tokenizer, n_random: int, seed: int = 1234, extra_ids=()) -> torch.Tensor:
    """A fixed text, then `extra_ids` (the rows CPT added, which random ids would rarely hit), then random ids."""
    text_ids = tokenizer(CHECK_TEXT)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    rand_ids = torch.randint(0, len(tokenizer), (n_random,), generator=g).tolist()
    return torch.tensor([text_ids + list(extra_ids) + rand_ids])


@torch.no_grad()
def _logits(model, ids: torch.Tensor, dev: torch.device) -> torch.Tensor:
    return model(input_ids=ids.to(dev)).logits.float().cpu()


def _save_dtype(name: str, base_path: str, trust_remote_code: bool = False) -> torch.dtype:
    if name == "auto":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
        name = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32")
        name = name.replace("torch.", "")
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise PipelineError(f"merge.save_dtype={name!r}: use auto, float32, bfloat16 or float16")
    return table[name]


def _with_adapter(base, adapter_dir, n_tokens: int, new_ids, low_cpu_mem_usage: bool = False):
    """`base` grown to the adapter's vocabulary exactly as CPT grew it, with the adapter applied.

    With `low_cpu_mem_usage`, PEFT assigns the loaded adapter tensors instead of initialising its own and copying
    the loaded ones in: full embedding copies (modules_to_save) are held once, not twice, while loading. An assigned
    tensor replaces a shared one, so a tied head gets its own copy of the same values; where the values differ (LoRA
    on a tied head) the streaming merge refuses, and a trained head copy that differs from the embedding fails the
    check of the saved file."""
    from peft import PeftModel

    fit_embeddings(base, n_tokens, new_ids)
    return PeftModel.from_pretrained(base, str(adapter_dir), low_cpu_mem_usage=low_cpu_mem_usage).eval()


def _compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    diff = (reference - other).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "top1_agreement": (reference.argmax(-1) == other.argmax(-1)).float().mean().item()}


def _release(dev: torch.device) -> None:
    """Hand freed memory back before the next phase. glibc keeps much of what a freed model held for the process's
    own reuse, and the next phase did not reuse it: without malloc_trim the phases' peaks add up."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _load_fp32(path, dev: torch.device, trust_remote_code: bool, skip_modules=()):
    """The float32 model of the checkpoint at `path`, read one tensor at a time straight onto `dev`.

    transformers' from_pretrained(dtype=float32) converts a 16-bit checkpoint out of a memory map of the whole file,
    whose pages stay in the process until the load ends (the fp32 model plus the file at the peak). Here transformers
    builds the architecture without weights (accelerate's init_empty_weights; buffers such as RoPE frequencies are
    computed in fp32 as from_pretrained computes them), each parameter is read from its file by name, and
    transformers' tie_weights ties what the config ties. A checkpoint whose tensor names are not the parameters'
    names (an architecture that renames keys on load) is loaded by from_pretrained instead. Parameters of the modules
    named in `skip_modules` (PEFT-style: the name or its last components) stay unloaded, on the meta device.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = base_weight_files(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    modules = dict(model.named_modules())
    skipped = {n for n in modules if any(n == m or n.endswith("." + m) for m in skip_modules)}
    for name, _ in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        if name in files and owner not in skipped:
            setattr(modules[owner], attr, torch.nn.Parameter(_read(files[name], name).to(dev), requires_grad=False))
    model.tie_weights()
    if any(p.is_meta for n, p in model.named_parameters() if n.rpartition(".")[0] not in skipped):
        del model
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map={"": str(dev)},
                                                    use_safetensors=True,
                                                    trust_remote_code=trust_remote_code).eval()
    for module in model.modules():  # the buffers (the parameters are there already, or deliberately not loaded)
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(dev)
    return model.eval()


def quantized_drift(model_cfg: ModelConfig, adapter_dir, vocab: tuple, ids: torch.Tensor, merged_logits,
                    base_ids: torch.Tensor, base_logits, device: str) -> dict:
    """How far the merged 16-bit model is from the model CPT actually trained (4-bit base + adapter).

    This is not an error: QLoRA trains against rounded weights, and the merged model uses the exact ones. It is
    the price of training in 4-bit, reported so that a user can see it (stage log, merge_check.json, metrics.json).
    The same comparison for the base alone (16-bit vs 4-bit, no adapter: `base_*`) says how much of it is the
    rounding itself, which on a small model is most of it.
    """
    dev = resolve_device(device)
    q = load_model(model_cfg.path, resolve_dtype(model_cfg.dtype, dev), dev, model_cfg.trust_remote_code,
                   load_in_4bit=True)
    q_base_logits = _logits(q, base_ids, dev)
    q_logits = _logits(_with_adapter(q, adapter_dir, *vocab), ids, dev)
    del q
    return {**_compare(merged_logits, q_logits),
            **{f"base_{k}": v for k, v in _compare(base_logits, q_base_logits).items()}}


# --- the streaming merge --------------------------------------------------------------------------------------------
# The tensor arithmetic is written here rather than taken from PEFT's merge_and_unload, which needs the whole model in
# memory (its layers merge into loaded weights). What is PEFT's is used: its config parsing (PeftConfig), its
# rank/alpha pattern matching (get_pattern_key), and its formulas, restated below: LoRA delta = B @ A x scaling
# (transposed for fan-in-fan-out Conv1D and for embeddings), scaling = alpha / r (alpha / sqrt(r) with rsLoRA);
# modules_to_save: the trained copy replaces the module; trainable tokens: the trained rows replace the base's rows.
# The verification compares the result with PEFT's own merge, and tests do so tensor by tensor.

@dataclass
class _Edit:
    """What the adapter does to one base tensor, in order: full replacement, LoRA update, token rows."""

    replace: Optional[str] = None  # adapter key of a trained full copy (modules_to_save) or a saved base layer
    lora: Optional[Tuple[str, str, float, bool]] = None  # (A key, B key, scaling, transpose)
    rows: Optional[Tuple[str, List[int]]] = None  # (delta key, token indices)
    keys: List[str] = field(default_factory=list)  # every adapter key this edit uses


def _read(file: Path, key: str) -> torch.Tensor:
    """One tensor, as float32. The file is opened per tensor: an open safetensors file keeps the whole file mapped,
    and every page read through that mapping would stay in the process until the file is closed."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key).to(torch.float32)


def _shapes(file: Path) -> Dict[str, Tuple[List[int], str]]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def base_weight_files(path) -> Dict[str, Path]:
    """Tensor name -> safetensors file of a checkpoint (one model.safetensors, or shards listed in the index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        return {k: single for k in _shapes(single)}
    raise PipelineError(f"model.path={path}: neither model.safetensors nor model.safetensors.index.json; the merge "
                        f"reads safetensors checkpoints only")


def _lora_scaling(config, module: str) -> float:
    """PEFT's scaling of the LoRA on `module` (LoraModel._create_and_replace and LoraLayer.update_layer)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _token_indices(config, module: str, embed_module: str) -> Optional[List[int]]:
    spec = config.trainable_token_indices
    if isinstance(spec, (list, tuple)):  # a bare list means the input embedding (PEFT's convention)
        spec = {embed_module: list(spec)}
    for name, ids in (spec or {}).items():
        if module == name or module.endswith("." + name):
            return list(ids)
    return None


def adapter_edits(adapter_dir, model, base_keys) -> Dict[str, _Edit]:
    """Base tensor name -> what the adapter at `adapter_dir` does to it. `model` is the architecture (meta device is
    enough): its module types decide PEFT's fan-in-fan-out, its embeddings which names a tied head shares.

    Every tensor in the adapter file is accounted for: used, or a redundant copy PEFT does not load either
    (`original_module`, the wrapper's second copy of a trained module). Anything else is an error naming the key.
    """
    from peft import PeftConfig, PeftType

    adapter_dir = Path(adapter_dir)
    file = adapter_dir / ADAPTER_FILE
    if not file.is_file():
        raise PipelineError(f"{adapter_dir}: no {ADAPTER_FILE} (the merge reads safetensors adapters only)")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if config.peft_type != PeftType.LORA:
        raise PipelineError(f"{adapter_dir}: a {config.peft_type} adapter; the merge handles LoRA adapters")
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        raise PipelineError(f"{adapter_dir}: DoRA or LoRA bias adapters are not supported by the merge")

    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    embed = names[model.get_input_embeddings()]
    head = names.get(model.get_output_embeddings())
    tied = is_tied(model)
    base_keys = set(base_keys)

    edits: Dict[str, _Edit] = {}
    keys = [k.removeprefix(PEFT_PREFIX) for k in _shapes(file)]
    lora = {}
    for k in keys:
        if ".modules_to_save." in k or ".original_module." in k:
            continue  # PEFT loads a trained module from `<module>.<param>`; these copies are not read (nor here)
        for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                             (".lora_embedding_B", "B")):
            if k.endswith(suffix):
                lora.setdefault(k[:-len(suffix)], {})[kind] = k
                break
        else:
            if k.endswith(".token_adapter.trainable_tokens_delta"):
                module = k[:-len(".token_adapter.trainable_tokens_delta")]
                target, ids = f"{module}.weight", _token_indices(config, module, embed)
                if ids is None:
                    if tied and module == head:
                        continue  # PEFT ties a tied head's token rows to the embedding's: nothing to load
                    raise PipelineError(f"{file}: {k} but adapter_config.json lists no trainable_token_indices for "
                                        f"{module}")
                edit = edits.setdefault(target, _Edit())
                edit.rows = (k, ids)
            else:  # a trained copy (modules_to_save), or a base layer PEFT saved with the adapter (resized vocab)
                target = k.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
                edit = edits.setdefault(target, _Edit())
                edit.replace = k
            edit.keys.append(k)
    for module, pair in lora.items():
        if set(pair) != {"A", "B"}:
            raise PipelineError(f"{file}: LoRA on {module} has only lora_{next(iter(pair))}")
        fan_in_fan_out = type(modules.get(module)).__name__ == "Conv1D"  # PEFT sets it by module type
        transpose = fan_in_fan_out or "lora_embedding_A" in pair["A"]
        edit = edits.setdefault(f"{module}.weight", _Edit())
        edit.lora = (pair["A"], pair["B"], _lora_scaling(config, module), transpose)
        edit.keys += [pair["A"], pair["B"]]

    head_key = f"{head}.weight" if head else None
    for target in list(edits):
        if target in base_keys:
            continue
        if tied and target == head_key:
            if edits[target].lora:
                raise PipelineError(f"{file}: LoRA on {head}, but the base's head is tied to its embedding (one "
                                    f"tensor): train embeddings in full (target_modules attn_mlp_embed) instead")
            del edits[target]  # the tied head is the embedding: its copy in the adapter is the same tensor
            continue
        raise PipelineError(f"{file}: adapter tensor(s) {edits[target].keys} modify {target}, which the base "
                            f"checkpoint does not have")
    return edits


def _grow_rows(w: torch.Tensor, n_tokens: int, new_ids) -> torch.Tensor:
    """modules.fit_embeddings on one tensor: grown to `n_tokens` rows, fresh rows at the mean of the other old rows."""
    rows = w.shape[0]
    grown = max(0, n_tokens - rows)
    if grown:
        w = torch.cat([w, w.new_empty(grown, *w.shape[1:])])
    fresh = sorted(set(new_ids) | set(range(rows, rows + grown)))
    if fresh:
        old = torch.ones(rows, dtype=torch.bool)
        old[[i for i in fresh if i < rows]] = False
        w[fresh] = w[:rows][old].mean(0, keepdim=True)
    return w


def _apply(w: torch.Tensor, edit: Optional[_Edit], adapter_file: Path, key: str) -> torch.Tensor:
    if edit is None:
        return w
    if edit.replace:
        new = _read(adapter_file, PEFT_PREFIX + edit.replace)
        if new.shape != w.shape:
            raise PipelineError(f"{adapter_file}: {edit.replace} has shape {list(new.shape)} but {key} has "
                                f"{list(w.shape)} after the vocabulary was grown to the adapter's tokenizer")
        w = new
    if edit.lora:
        a_key, b_key, scaling, transpose = edit.lora
        delta = _read(adapter_file, PEFT_PREFIX + b_key) @ _read(adapter_file, PEFT_PREFIX + a_key)
        delta = delta.T if transpose else delta
        if delta.shape != w.shape:
            raise PipelineError(f"{adapter_file}: the LoRA update of {key} has shape {list(delta.shape)}, the tensor "
                                f"{list(w.shape)}: the adapter was not trained on this base model")
        w += delta * scaling
    if edit.rows:
        delta_key, ids = edit.rows
        w[ids] = _read(adapter_file, PEFT_PREFIX + delta_key)
    return w


def merge_plan(base_path, adapter_dir, trust_remote_code: bool = False) -> tuple:
    """(base tensor name -> file, tensor name -> the adapter's edit, the names whose rows grow with added tokens),
    from the safetensors headers and the model's architecture on the meta device: no weight is read. The adapter's
    own problems (LoRA on a tied head, DoRA, a tensor the merge would not use) are refused here."""
    model = meta_model(str(base_path), trust_remote_code)
    modules = {m: n for n, m in model.named_modules()}
    embed_key = modules[model.get_input_embeddings()] + ".weight"
    head = model.get_output_embeddings()
    tied = is_tied(model)
    head_key = modules[head] + ".weight" if head is not None else None
    files = base_weight_files(base_path)
    if tied and head_key in files:
        del files[head_key]  # transformers ties it on load; writing it would store the embedding twice
    return files, adapter_edits(adapter_dir, model, files), {embed_key} | ({head_key} if head_key and not tied
                                                                           else set())


def stream_merge(base_path, adapter_dir, out_dir, save_dtype: torch.dtype, n_tokens: int, new_ids=(),
                 trust_remote_code: bool = False, shard_bytes: int = SHARD_BYTES, plan: Optional[tuple] = None) -> dict:
    """Write base + adapter (merged in fp32, stored in `save_dtype`) as a safetensors checkpoint in `out_dir`, with the
    base's config (vocabulary grown to `n_tokens`) and generation config. Returns what was done, for the report.
    `plan`: merge_plan's result, when the caller has it already."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    base_path, out_dir = Path(base_path), Path(out_dir)
    files, edits, grow = plan or merge_plan(base_path, adapter_dir, trust_remote_code)
    adapter_file = Path(adapter_dir) / ADAPTER_FILE

    # The plan first (shapes only), so that shard names carry their count and no shard exceeds shard_bytes.
    shapes = {}
    for f in dict.fromkeys(files.values()):
        shapes.update({k: s for k, (s, _) in _shapes(f).items() if k in files})
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise PipelineError(f"{base_path}: the index lists {missing[0]} but its shard does not hold it")
    item = torch.tensor([], dtype=save_dtype).element_size()
    shards: List[List[str]] = [[]]
    size = total = 0
    for k in files:
        shape = list(shapes[k])
        if k in grow:
            shape[0] = max(shape[0], n_tokens)
        nbytes = math.prod(shape) * item
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
        total += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    counts = {"lora": 0, "replaced": 0, "token_rows": 0, "grown": 0}
    for name, keys in zip(names, shards):
        shard = {}
        for k in keys:
            w = _read(files[k], k)
            if k in grow and (w.shape[0] < n_tokens or new_ids):
                w = _grow_rows(w, n_tokens, new_ids)
                counts["grown"] += 1
            edit = edits.get(k)
            w = _apply(w, edit, adapter_file, k)
            if edit:
                counts["lora"] += bool(edit.lora)
                counts["replaced"] += bool(edit.replace)
                counts["token_rows"] += bool(edit.rows)
            shard[k] = w.to(save_dtype).contiguous()
            del w
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        del shard
        _release(torch.device("cpu"))
    if len(names) > 1:
        write_json(out_dir / "model.safetensors.index.json", {
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}})

    config = AutoConfig.from_pretrained(str(base_path), trust_remote_code=trust_remote_code)
    text_config = config.get_text_config()
    if n_tokens > text_config.vocab_size:
        text_config.vocab_size = n_tokens  # as resize_token_embeddings records it
    config.dtype = save_dtype
    config.save_pretrained(str(out_dir))
    if not (base_path / "generation_config.json").is_file():  # what save_pretrained would write for the model
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    for extra in ["generation_config.json"] + ([p.name for p in base_path.glob("*.py")] if trust_remote_code else []):
        if (base_path / extra).is_file():
            shutil.copy2(base_path / extra, out_dir / extra)
    return {"shards": len(names), "tensors": len(files), "bytes": total, "edited": counts}


# --- the stage ------------------------------------------------------------------------------------------------------

def _check_loaded(model, allowed: Optional[str] = None) -> None:
    unloaded = [n for n, p in model.named_parameters() if p.is_meta and not (allowed and allowed in n)]
    if unloaded:
        raise RuntimeError(f"merge verification: weights {unloaded[:3]} of the reference model were never loaded")


def _reference(model_cfg: ModelConfig, adapter_dir, vocab: tuple, ids: torch.Tensor, dev: torch.device,
               save_dtype: torch.dtype, keep_base_logits: bool) -> dict:
    """Step 1 of the verification (module docstring), on the one model it loads: logits of base + adapter, of PEFT's
    merge of it (in place), and of that merge rounded to `save_dtype` (in place).

    The base's own weights of modules the adapter trained in full (modules_to_save: embed_tokens/lm_head) are not
    loaded: with the adapter active PEFT runs only the trained copies, and its merge keeps only those, so the model
    holds one copy of the embeddings instead of two. Not when CPT added tokens (growing a matrix needs its values)
    or when the base's own logits are wanted (the 4-bit drift report)."""
    from peft import PeftConfig
    from transformers import AutoConfig

    in_full = PeftConfig.from_pretrained(str(adapter_dir)).modules_to_save or ()
    n_tokens, new_ids = vocab
    rows = AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code).get_text_config()
    grows = bool(new_ids) or n_tokens > rows.vocab_size
    skip = () if keep_base_logits or grows else in_full
    model = _load_fp32(model_cfg.path, dev, model_cfg.trust_remote_code, skip_modules=skip)
    out = {"tied": is_tied(model)}
    if keep_base_logits:  # for the 4-bit drift: the base's own logits, before the adapter (and any added rows)
        out["base_ids"] = ids[:, ids[0] < embedding_rows(model)]
        out["base"] = _logits(model, out["base_ids"], dev)
    model = _with_adapter(model, adapter_dir, *vocab, low_cpu_mem_usage=True)
    # torch runs an op on a meta weight and a real input and returns uninitialised memory: make sure that the only
    # weights not loaded are the originals PEFT does not run, and that the merge dropped them
    _check_loaded(model, allowed=".original_module.")
    out["reference"] = _logits(model, ids, dev)
    model = model.merge_and_unload().eval()
    _check_loaded(model)
    out["merged"] = _logits(model, ids, dev)
    if save_dtype == torch.float32:
        out["stored"] = out["merged"]
    else:
        with torch.no_grad():  # only the parameters are stored; buffers (RoPE frequencies) are rebuilt in fp32 on load
            for p in model.parameters():
                p.copy_(p.to(save_dtype))  # in place: no second fp32 copy of any tensor
        out["stored"] = _logits(model, ids, dev)
    if not out["tied"]:  # kept (in the save dtype, on the CPU) for embedding_mismatch
        out["embeddings"] = model.get_input_embeddings().weight.detach().to("cpu", save_dtype, copy=True)
    return out


@torch.no_grad()
def embedding_mismatch(saved, reference: torch.Tensor, save_dtype: torch.dtype) -> Optional[str]:
    """Why the saved model's input embeddings are not the verified merge's (rounded to the save dtype), or None.

    The logit comparison covers every tensor that acts at every position, the output head included, but a row of an
    untied model's input embeddings acts only where its token occurs, and the check sample holds a few hundred of a
    vocabulary's tens of thousands. So those rows are compared directly, a block at a time: equal up to two units of
    the save dtype's rounding (the reference merge may run on a GPU, the streamed one on the CPU)."""
    w = saved.get_input_embeddings().weight
    if tuple(w.shape) != tuple(reference.shape):
        return f"input embeddings of shape {tuple(w.shape)}, the verified merge's are {tuple(reference.shape)}"
    # Small blocks and in-place arithmetic: this runs while the reloaded fp32 model is in memory, the stage's peak.
    eps, blocks = torch.finfo(save_dtype).eps, range(0, w.shape[0], 1024)
    floor = eps * max(reference[i:i + 1024].abs().max().float().item() for i in blocks) / 256  # entries near zero
    bad_rows, worst = [], 0.0
    for start in blocks:
        ref = reference[start:start + 1024].to(torch.float32, copy=True)
        diff = (w[start:start + 1024].detach().cpu().float() - ref).abs_()
        over = (diff > ref.abs_().mul_(2 * eps).add_(floor)).any(dim=1)  # allowed: 2 units of rounding
        bad_rows += (over.nonzero().flatten() + start).tolist()
        worst = max(worst, diff.max().item())
    if bad_rows:
        return (f"{len(bad_rows)} row(s) of the input embeddings (token ids {bad_rows[:5]}) differ from the verified "
                f"merge's by up to {worst:.4g}")
    return None


def merge_adapter(cfg: MergeConfig, model_cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path,
                  device: str = "auto") -> Path:
    """Merge `adapter_dir` into model.path tensor by tensor, verify the logits, publish the checkpoint at `out_dir`."""
    out_dir = Path(out_dir)
    if is_prequantized(model_cfg.path):
        raise PipelineError(f"model.path={model_cfg.path}: a pre-quantized checkpoint (its config.json has a "
                            f"quantization_config); the merge needs the 16-bit weights. Point model.path at the "
                            f"16-bit model and set model.load_in_4bit=true to train in 4-bit")
    dev = resolve_device(device)
    stats_file = Path(adapter_dir) / "cpt_stats.json"
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else {}
    tok = load_tokenizer(adapter_dir, model_cfg.trust_remote_code)
    new_ids = stats.get("added_token_ids", [])
    vocab = (len(tok), new_ids)  # the vocabulary CPT trained with
    ids = check_sample(tok, cfg.check_tokens, extra_ids=new_ids)
    save_dtype = _save_dtype(cfg.save_dtype, model_cfg.path, model_cfg.trust_remote_code)
    quantized = bool(stats.get("load_in_4bit"))  # CPT trained on a 4-bit copy of the base (QLoRA)
    plan = merge_plan(model_cfg.path, adapter_dir, model_cfg.trust_remote_code)  # refusals before any model loads

    ref = _reference(model_cfg, adapter_dir, vocab, ids, dev, save_dtype, quantized)
    _release(dev)
    diff = (ref["merged"] - ref["reference"]).abs().max().item()
    scale = ref["reference"].abs().max().item()
    tolerance = cfg.max_abs_logit_diff + cfg.rel_logit_diff * scale
    log.info("merge check: max |logit(adapter) - logit(merged)| = %.3g on %d tokens (tolerance %.2g for max "
             "|logit| %.1f)", diff, ids.shape[1], tolerance, scale)
    if not diff <= tolerance:  # `not <=` also catches NaN
        raise PipelineError(
            f"merge check failed: merged model's logits differ from the adapter model's by {diff:.4g} (> "
            f"{tolerance:.3g} = merge.max_abs_logit_diff {cfg.max_abs_logit_diff:g} + merge.rel_logit_diff "
            f"{cfg.rel_logit_diff:g} x max|logit| {scale:.1f}); the merged model is broken and was not saved"
        )
    cast_drift = (ref["stored"] - ref["reference"]).abs().max().item()

    with atomic_output(out_dir) as tmp:
        info = stream_merge(model_cfg.path, adapter_dir, tmp, save_dtype, *vocab, model_cfg.trust_remote_code,
                            plan=plan)
        tok.save_pretrained(tmp)  # the adapter's tokenizer: added tokens and the chat template
        saved = _load_fp32(tmp, dev, model_cfg.trust_remote_code)
        saved_logits, saved_tied, rows = _logits(saved, ids, dev), is_tied(saved), embedding_rows(saved)
        rows_wrong = embedding_mismatch(saved, ref["embeddings"], save_dtype) if "embeddings" in ref else None
        del saved
        _release(dev)
        file_diff = (saved_logits - ref["stored"]).abs().max().item()
        log.info("saved checkpoint (%s, %d shard(s)): max |logit(saved) - logit(merged, rounded to %s)| = %.3g "
                 "(tolerance %.2g); the rounding itself moves logits by %.3g", str(save_dtype).replace("torch.", ""),
                 info["shards"], str(save_dtype).replace("torch.", ""), file_diff, tolerance, cast_drift)
        if not file_diff <= tolerance or saved_tied != ref["tied"]:
            raise PipelineError(
                f"merge check failed: the saved checkpoint's logits differ from the verified merge's by {file_diff:.4g}"
                f" (tolerance {tolerance:.3g}), tied={saved_tied} vs base tied={ref['tied']}; nothing was published")
        if rows_wrong:
            raise PipelineError(f"merge check failed: the saved checkpoint's {rows_wrong}; nothing was published")
        drift = None
        if quantized:
            try:  # a report, not a check: a machine that cannot run 4-bit still merges (e.g. stages=[merge] on a CPU)
                drift = quantized_drift(model_cfg, adapter_dir, vocab, ids, saved_logits, ref["base_ids"],
                                        ref["base"], device)
                log.info("4-bit drift: the merged 16-bit model vs the 4-bit model CPT trained: max |dlogit| %.3g, "
                         "mean %.3g, same top-1 token on %.1f%% of positions (the base alone, 16-bit vs 4-bit: max "
                         "%.3g, mean %.3g, %.1f%%)", drift["max_abs_logit_diff"], drift["mean_abs_logit_diff"],
                         100 * drift["top1_agreement"], drift["base_max_abs_logit_diff"],
                         drift["base_mean_abs_logit_diff"], 100 * drift["base_top1_agreement"])
            except Exception as e:  # noqa: BLE001 also bitsandbytes' CPU kernels, which refuse some layer sizes
                first = (str(e).strip().splitlines() or [""])[0]
                drift = {"not_measured": first if isinstance(e, PipelineError) else f"{type(e).__name__}: {first}"}
                log.warning("4-bit drift not measured: the 4-bit model CPT trained could not be run here (%s); the "
                            "merge itself is verified as usual", e)
            _release(dev)
        write_json(tmp / "merge_check.json", {
            "adapter": str(adapter_dir), "base": str(model_cfg.path), "check_tokens": int(ids.shape[1]),
            "max_abs_logit_diff": diff, "tolerance": tolerance, "max_abs_logit": scale,
            "save_dtype": str(save_dtype).replace("torch.", ""), "save_dtype_logit_drift": cast_drift,
            "reload_max_abs_logit_diff": file_diff,
            "saved_vs_adapter_max_abs_logit_diff": (saved_logits - ref["reference"]).abs().max().item(),
            "tied_embeddings": ref["tied"], "vocab_rows": rows, "shards": info["shards"],
            "embedding_rows_compared": None if ref["tied"] else rows,  # untied: every input row (embedding_mismatch)
            "edited_tensors": info["edited"], "verified_on": str(dev), "quantized_training_drift": drift,
        })
        write_lineage(tmp, "cpt_model", model_cfg.path, parent=adapter_dir)
    return out_dir
