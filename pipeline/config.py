"""The typed configuration. Each dataclass is one Hydra config group (conf/<group>/*.yaml mirrors it field by field).

These names are the public interface: users and sweep files refer to them (`cpt.lora_alpha=128`), so they are
stable. Hydra composes YAML; `typed()` checks a composed section against its dataclass and reports the bad key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .common import PipelineError


@dataclass
class DemoBuildConfig:
    """How the embedded demo base model is built when `model.build_demo_if_missing` is true."""

    corpus: List[str] = field(default_factory=lambda: ["data/pretrain/public_corpus.txt"])
    tokenizer_extra_text: List[str] = field(default_factory=lambda: ["data/sft/chat.jsonl"])
    # Files whose *characters* (not words) the tokenizer must cover, as a real Japanese tokenizer covers every common
    # kanji; without this, each new name in the CPT corpus would be split into raw UTF-8 bytes.
    tokenizer_charset: List[str] = field(default_factory=lambda: ["data/cpt", "eval_sets"])
    vocab_size: int = 4000  # byte-level BPE: Japanese needs merges, a tiny model needs a small embedding
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_epochs: float = 50.0
    learning_rate: float = 3.0e-3
    batch_size: int = 8
    seed: int = 0


@dataclass
class ModelConfig:
    path: str = "outputs/demo_base_model"  # local Hugging Face checkpoint directory (never a hub name)
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on a GPU; also float32/bfloat16/float16
    max_seq_length: int = 128  # CPT block length and SFT max length
    trust_remote_code: bool = False
    # Used for SFT and the SFT model's eval when the tokenizer has no chat template. {prompt} is the user turn.
    prompt_template: str = "質問: {prompt}\n回答:\n"
    chat_template: Optional[str] = None  # a Jinja string or a .jinja file that replaces the tokenizer's template
    # Override the module names that target_modules presets resolve to, e.g. {attn: [c_attn], mlp: [c_fc]}.
    modules: Optional[Dict[str, Any]] = None
    # What a family config expects (true/false); checked against the checkpoint before training. null: not checked.
    tied_embeddings: Optional[bool] = None
    # QLoRA: CPT and SFT train LoRA on frozen 4-bit (nf4, bitsandbytes) base weights. Merge and eval always use the
    # 16-bit weights at model.path; the merge reports the logit drift between the 4-bit adapter model and the result.
    load_in_4bit: bool = False
    # Tokens added to the tokenizer before CPT (e.g. a chat template's markers). Their embedding rows are created
    # (the matrix grows when needed) and trained in CPT and SFT.
    add_special_tokens: List[str] = field(default_factory=list)
    build_demo_if_missing: bool = False
    demo: DemoBuildConfig = field(default_factory=DemoBuildConfig)


@dataclass
class DataPath:
    path: Optional[str] = None
    text_field: str = "text"  # the field holding a document in .jsonl CPT files


@dataclass
class DataConfig:
    cpt: DataPath = field(default_factory=DataPath)
    sft: DataPath = field(default_factory=DataPath)
    qa: DataPath = field(default_factory=DataPath)
    general_qa: DataPath = field(default_factory=DataPath)  # facts the base model knows: the price of CPT/SFT
    heldout: DataPath = field(default_factory=DataPath)  # untrained domain text (.jsonl `text` / .txt): perplexity


@dataclass
class LoraStageConfig:
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: Any = "attn_mlp"  # a preset (attn, mlp, attn_mlp, attn_mlp_embed) or a list of module names
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    learning_rate: float = 1.0e-4
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    logging_steps: int = 10


@dataclass
class CptConfig(LoraStageConfig):
    # Learning rate of fully trained embed_tokens/lm_head (when target_modules includes them), as unsloth's
    # embedding_learning_rate: usually 2-10x below learning_rate, because every row moves on every step.
    embedding_learning_rate: float = 1.0e-4


@dataclass
class SftConfig(LoraStageConfig):
    max_length: Optional[int] = None  # default: model.max_seq_length


@dataclass
class MergeConfig:
    # Merged vs adapter model, both fp32. Allowed: max_abs_logit_diff + rel_logit_diff * max|logit|. Rounding grows
    # with the logits' size (correct demo merges: 9e-5 to 3.4e-4 at max|logit| 20); a broken merge is off by 1-30.
    max_abs_logit_diff: float = 1.0e-4
    rel_logit_diff: float = 1.0e-4
    check_tokens: int = 128  # random token ids (plus a fixed text) fed to both models for the check
    save_dtype: str = "auto"  # auto = the base checkpoint's dtype; or float32/bfloat16/float16


@dataclass
class EvalConfig:
    models: List[str] = field(default_factory=lambda: ["base", "cpt", "sft"])
    # Base and CPT models are not instruction-tuned: they get a completion prompt, the answer is cut at the first
    # `completion_stop`. The SFT model gets its chat template (or model.prompt_template).
    completion_prompt: str = "質問: {question}\n答え: "
    completion_stop: str = "\n"
    max_new_tokens: int = 48
    batch_size: int = 16
    headline_metric: str = "contains"  # exact_match, contains, char_f1 or logprob
    max_questions: Optional[int] = None  # evaluate only the first N questions (quick checks)
    # The SFT answers' expected shape, a regex matched against the whole stripped answer (e.g. ".{1,30}です。");
    # null: an answer is in format when it is non-empty, stopped by itself and not repetitive.
    expected_format: Optional[str] = None
    judge_path: Optional[str] = None  # a local model that also grades answers (はい/いいえ); off when null
    judge_prompt: str = ("質問: {question}\n正解: {gold}\n回答: {answer}\n"
                         "回答は正解と同じ内容ですか？ はい か いいえ で答えてください。\n答え: ")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "cpt": CptConfig,
    "merge": MergeConfig,
    "sft": SftConfig,
    "eval": EvalConfig,
}


def typed(cfg: DictConfig, section: str):
    """Return `cfg.<section>` as its dataclass, or raise a PipelineError that names the offending key."""
    schema = SECTIONS[section]
    # `???` in a YAML file means "you must set this"; merging it onto the dataclass would keep the default instead.
    missing = sorted(k if k.startswith(f"{section}.") else f"{section}.{k}"
                     for k in OmegaConf.missing_keys(cfg[section]))
    if missing:
        raise PipelineError(f"config key {missing[0]}: Missing mandatory value; set it on the command line "
                            f"({missing[0]}=...)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg[section])
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise PipelineError(f"config key {section}.{key}: {msg}") from None


def flat_config(cfg: DictConfig) -> Dict[str, Any]:
    """Every config value a sweep may vary, as flat dotted keys (lists joined by commas)."""
    out: Dict[str, Any] = {}
    container = OmegaConf.to_container(cfg, resolve=True)

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list):
            out[prefix] = ",".join(str(x) for x in node)
        else:
            out[prefix] = node

    for key in ("seed", "backend", "model", "data", "cpt", "merge", "sft", "eval"):
        if key in container:
            walk(key, container[key])
    out.pop("model.demo", None)
    return {k: v for k, v in out.items() if not k.startswith("model.demo.")}
