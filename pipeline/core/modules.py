"""`target_modules` presets, resolved to each architecture's own module names.

Presets: attn (q,k,v,o), mlp (gate,up,down), attn_mlp, attn_mlp_embed (attn_mlp plus embed_tokens and lm_head, the
seed's CPT setting). Embedding and output layers are never given LoRA: like unsloth, they go to `modules_to_save` and
are trained in full. With tied embeddings only the input embedding is saved and PEFT re-ties the head to it
(`ensure_weight_tying`); LoRA on a tied embed/lm_head merges wrongly (both deltas land in the one shared tensor).

`layers` (cpt.layers / sft.layers) restricts LoRA to some decoder layers (PEFT `layers_to_transform`): null = all,
a list of indices [8, 9, 10, 11], a range "12-23" (inclusive), or "upper_half" / "lower_half". Embedding copies
(modules_to_save) are not layers and are unaffected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from pipeline.core.outputs import PipelineError

log = logging.getLogger(__name__)

_LLAMA_STYLE = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "embed": "embed_tokens",
    "lm_head": "lm_head",
}
# model_type → module names. llm-jp-3 is model_type "llama"; Qwen, Gemma and Mistral use the same names.
FAMILIES: Dict[str, Dict[str, Any]] = {
    **{t: _LLAMA_STYLE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                                 "olmo2", "granite", "cohere")},
    "phi3": {"attn": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"], "embed": "embed_tokens",
             "lm_head": "lm_head"},
    "gpt_neox": {"attn": ["query_key_value", "dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"],
                 "embed": "embed_in", "lm_head": "embed_out"},  # embed/head names are read off the model anyway
}
# Names of embedding/head modules across the architectures above (for reading a target list without a model).
EMBED_NAMES = ("embed_tokens", "lm_head", "embed_in", "embed_out")

PRESETS = {
    "attn": ("attn",),
    "mlp": ("mlp",),
    "attn_mlp": ("attn", "mlp"),
    "attn_mlp_embed": ("attn", "mlp", "embed", "lm_head"),
}


@dataclass
class Targets:
    lora: List[str]  # module names that get LoRA
    modules_to_save: List[str]  # trained in full (embeddings / head)
    tied: bool  # the model shares one tensor between input embeddings and the head
    ensure_weight_tying: bool  # ask PEFT to keep the head tied to the trained embedding copy
    layers: Optional[List[int]] = None  # decoder layers that get LoRA (None: all); set by `resolve_layers`
    layers_pattern: Optional[str] = None  # the name of the ModuleList that holds them, e.g. "layers"

    @property
    def trains_embeddings(self) -> bool:
        return bool(self.modules_to_save)


def _leaf_name_of(model: nn.Module, module: Optional[nn.Module], default: str) -> str:
    for name, m in model.named_modules():
        if m is module and name:
            return name.rsplit(".", 1)[-1]
    return default


def module_names(model: nn.Module, override: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The architecture's names for attn/mlp/embed/lm_head (model.modules overrides them key by key).

    Embedding and head names come from the model itself (get_input/output_embeddings), attn/mlp from FAMILIES.
    """
    model_type = getattr(model.config, "model_type", "")
    names = dict(FAMILIES.get(model_type, _LLAMA_STYLE))
    names["embed"] = _leaf_name_of(model, model.get_input_embeddings(), names["embed"])
    names["lm_head"] = _leaf_name_of(model, model.get_output_embeddings(), names["lm_head"])
    for k, v in (override or {}).items():
        if k not in ("attn", "mlp", "embed", "lm_head"):
            raise PipelineError(f"model.modules.{k}: unknown group (attn, mlp, embed, lm_head)")
        if k in ("attn", "mlp"):
            names[k] = [v] if isinstance(v, str) else list(v)  # list("c_attn") would split it into letters
        else:
            names[k] = str(v)
    return names


def is_tied(model: nn.Module) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _leaf_names(model: nn.Module, kinds: tuple) -> List[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, kinds)})


def resolve_targets(spec: Any, model: nn.Module, override: Optional[Dict[str, Any]] = None,
                    key: str = "target_modules") -> Targets:
    names = module_names(model, override)
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise PipelineError(f"{key}={spec!r}: unknown preset; use one of {', '.join(PRESETS)} or a list of "
                                f"module names")
        wanted: List[str] = []
        for group in PRESETS[spec]:
            wanted += names[group] if group in ("attn", "mlp") else [names[group]]
    else:
        wanted = [str(x) for x in spec]
        if not wanted:
            raise PipelineError(f"{key}: empty list")

    full_train = {names["embed"], names["lm_head"]}
    lora = [w for w in wanted if w not in full_train]
    save = [w for w in wanted if w in full_train]

    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    available = sorted(set(_leaf_names(model, (nn.Linear,))) - full_train) + sorted(full_train)
    for w in lora + save:
        if w not in present:
            raise PipelineError(
                f"{key}: module {w!r} does not exist in this {model.config.model_type} model; available: "
                f"{', '.join(available)}"
            )
    tied = is_tied(model)
    if tied and save:
        # One shared tensor: train the input embedding copy and re-tie the head to it.
        save = [names["embed"]]
    return Targets(lora=lora, modules_to_save=save, tied=tied, ensure_weight_tying=tied and bool(save))


def check_rank(r: int, targets: Targets, model: nn.Module, key: str) -> None:
    """A LoRA rank above min(in, out) of a target adds parameters and time but no capacity there: B @ A cannot have a
    higher rank than the layer. Above every LoRA target's (`cpt.r=100000` on a small model, minutes per step for
    nothing) it is refused; above only some (e.g. a GQA model's narrow k/v projections, while q/o/MLP use the full
    rank) it is a warning, as the adapter is still what the user asked for everywhere else."""
    sizes = {}
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets.lora and hasattr(m, "in_features") and hasattr(m, "out_features"):
            sizes[leaf] = max(sizes.get(leaf, 0), min(m.in_features, m.out_features))
    if not sizes:
        return
    narrow = sorted(n for n, size in sizes.items() if r > size)
    if len(narrow) == len(sizes):
        raise PipelineError(f"{key.rsplit('.', 1)[0]}.r={r}: larger than every LoRA target can use (min(in, out) "
                            f"is at most {max(sizes.values())}: {', '.join(f'{n} {sizes[n]}' for n in sorted(sizes))}); "
                            f"a rank above that adds parameters and time, never capacity")
    if narrow:
        log.warning("%s.r=%d is above min(in, out) of %s: there it adds parameters but no capacity",
                    key.rsplit(".", 1)[0], r, ", ".join(f"{n} ({sizes[n]})" for n in narrow))


def decoder_layers(model: nn.Module) -> tuple:
    """(name of the ModuleList holding the decoder layers, their number), e.g. ("layers", 32) for Llama.

    The list is found by its length (config num_hidden_layers), so any architecture whose blocks sit in one
    ModuleList works; PEFT needs the name to read a layer index off module names that hold more than one number
    (MoE experts: "layers.3.mlp.experts.5.up_proj" is layer 3).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n and len(module) == n and name:
            return name.rsplit(".", 1)[-1], n
    raise PipelineError(f"cannot find this {model.config.model_type} model's decoder layers (a ModuleList of "
                        f"num_hidden_layers={n} blocks): cpt.layers / sft.layers need them; leave them null")


def resolve_layers(spec: Any, model: nn.Module, key: str = "layers") -> tuple:
    """`layers` setting → (sorted layer indices or None for all, the ModuleList name PEFT matches them in).

    null: all layers. A list of indices; a range string "a-b" (inclusive); "upper_<k>" (the last k layers);
    "upper_half" (the last n//2 layers: in
    "Spurious Forgetting" (arXiv 2501.13453) the drop after training on a new task came from updates to the bottom
    layers, and freezing them kept the earlier task; adapting only the upper layers leaves the lower ones as CPT left
    them) or "lower_half" (the first n - n//2). Indices are checked against the model's num_hidden_layers.
    """
    if spec is None:
        return None, None
    pattern, n = decoder_layers(model)
    if isinstance(spec, str):
        text = spec.strip()
        if text == "upper_half":
            layers = list(range(n - n // 2, n))
        elif text == "lower_half":
            layers = list(range(0, n - n // 2))
        elif text.startswith("upper_") and text[6:].isdigit():  # the last k layers: a search dimension's strength
            k = int(text[6:])
            if not 1 <= k <= n:
                raise PipelineError(f"{key}={spec!r}: this model has num_hidden_layers={n}; use upper_1 to upper_{n}")
            layers = list(range(n - k, n))
        elif "-" in text and all(part.strip().isdigit() for part in text.split("-", 1)):
            lo, hi = (int(part) for part in text.split("-", 1))
            if lo > hi:
                raise PipelineError(f"{key}={spec!r}: the range's start is above its end")
            layers = list(range(lo, hi + 1))
        else:
            raise PipelineError(f"{key}={spec!r}: use null (all layers), a list of indices, a range like \"12-23\", "
                                f"upper_<k> (the last k layers), upper_half or lower_half")
    elif isinstance(spec, int) and not isinstance(spec, bool):
        layers = [spec]
    elif isinstance(spec, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        layers = list(spec)
    else:
        raise PipelineError(f"{key}={spec!r}: use null (all layers), a list of integer indices, a range like "
                            f"\"12-23\", upper_half or lower_half")
    if not layers:
        raise PipelineError(f"{key}: no layer selected (null means all layers)")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise PipelineError(f"{key}: layer index {bad[0]} is out of range; this model has num_hidden_layers={n} "
                            f"(indices 0-{n - 1})")
    return sorted(set(layers)), pattern


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The factor LoRA's update B@A is multiplied by: alpha/r, or alpha/sqrt(r) with rsLoRA (arXiv 2312.03732).

    Recorded as cpt/lora_scale and sft/lora_scale: alpha alone is not comparable across ranks or between the two."""
    return alpha / (r ** 0.5 if use_rslora else r)


def meta_model(path: str, trust_remote_code: bool = False) -> nn.Module:
    """The architecture without weights (meta device): validates module names in milliseconds, even for 13B."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def lora_config(targets: Targets, r: int, alpha: float, dropout: float, use_rslora: bool,
                trainable_tokens: Optional[Dict[str, List[int]]] = None):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets.lora),  # copies: PEFT extends these lists in place
        modules_to_save=list(targets.modules_to_save) or None,
        trainable_token_indices=trainable_tokens or None,
        ensure_weight_tying=targets.ensure_weight_tying,
        use_rslora=use_rslora,
        layers_to_transform=list(targets.layers) if targets.layers is not None else None,
        layers_pattern=targets.layers_pattern if targets.layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


# --- vocabulary changes (model.add_special_tokens) ---------------------------------------------------------------

def embedding_rows(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def add_tokens(tokenizer, tokens: List[str], rows: int, where: str) -> List[int]:
    """Add `tokens` to the tokenizer as special tokens; returns the ids whose embedding rows were never trained.

    Those are the tokens that were not in the vocabulary before, and any listed token whose id lies beyond the
    model's `rows` embedding rows. `where` names the checkpoint in errors (e.g. "model.path=/models/x"). A tokenizer
    with *other* ids beyond the embedding is refused: the model has no vector for them, and nothing in the pipeline
    would train one.
    """
    known = tokenizer.get_vocab()
    if tokens:
        tokenizer.add_tokens(list(tokens), special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    new = sorted({i for t, i in zip(tokens, ids) if t not in known or i >= rows})
    beyond = [i for i in range(rows, len(tokenizer)) if i not in new]
    if beyond:
        names = tokenizer.convert_ids_to_tokens(beyond[:5])
        raise PipelineError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model has only {rows} embedding rows; "
            f"token(s) {names}{' ...' if len(beyond) > 5 else ''} have no embedding. List them in "
            f"model.add_special_tokens so that the embeddings are resized and trained, or use the model's own "
            f"tokenizer")
    return new


def fit_embeddings(model: nn.Module, n_tokens: int, new_ids: List[int] = ()) -> int:
    """Grow the embedding matrix (and an untied head) to `n_tokens` rows and start the rows of `new_ids` at the mean
    of the other rows; returns the number of rows added.

    New ids can also land on existing rows that no token used (Qwen pads its matrix to a multiple of 128): those
    start at the mean too, not at whatever the checkpoint left there. Not transformers' mean_resizing, which adds
    random noise: the merge stage rebuilds the same base from model.path and must get exactly the rows CPT started
    from.
    """
    rows = embedding_rows(model)
    grown = max(0, n_tokens - rows)
    if grown:
        model.resize_token_embeddings(n_tokens, mean_resizing=False)
    fresh = sorted(set(new_ids) | set(range(rows, rows + grown)))
    if fresh:
        old = torch.ones(rows, dtype=torch.bool)
        old[[i for i in fresh if i < rows]] = False
        with torch.no_grad():
            layers = [model.get_input_embeddings(), model.get_output_embeddings()]
            for w in {id(layer.weight): layer.weight for layer in layers if layer is not None}.values():
                w[fresh] = w[:rows][old.to(w.device)].mean(0, keepdim=True).to(w.dtype)
    return grown


def token_training(new_ids: List[int], targets: Targets, model: nn.Module,
                   override: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, List[int]]]:
    """PEFT `trainable_token_indices` for new tokens whose embedding (and untied head) rows are not trained in full.

    Only those rows train (PEFT's TrainableTokens); with tied embeddings the head follows the embedding.
    """
    if not new_ids:
        return None
    names = module_names(model, override)
    layers = [names["embed"]] + ([] if targets.tied else [names["lm_head"]])
    spec = {name: list(new_ids) for name in layers if name not in targets.modules_to_save}
    return spec or None
