"""The typed configuration. Each dataclass is one Hydra config group (conf/<group>/*.yaml mirrors it field by field).

These names are the public interface: users and sweep files refer to them (`cpt.lora_alpha=128`), so they are
stable. Hydra composes YAML; `typed()` checks a composed section against its dataclass and reports the bad key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.core.outputs import PipelineError


def key(default: Any, *, ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
        lt: Optional[float] = None, choices: Optional[tuple] = None, pattern: Optional[str] = None, doc: str = "",
        runtime: bool = False):
    """A config field with its allowed range declared next to it (`check_ranges` enforces it before any model
    loads). Bounds apply to numbers (None passes: "not set"), `choices` and `pattern` (a regex the whole value must
    match) to strings. Every float must also be finite: inf and nan are refused. `runtime=True` marks a key that
    changes only how a stage runs or reports (logging, batch size of scoring, check tolerances), never what it
    produces: it stays out of the stage's cache key (`cache_settings`)."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, pattern=pattern).items()
            if v is not None}
    meta.update(doc=doc, runtime=runtime)
    return field(default=default, metadata=meta)


def cache_settings(section: Any) -> Dict[str, Any]:
    """A stage's settings as they enter its cache key: every field except those declared `runtime`."""
    return {f.name: (cache_settings(getattr(section, f.name)) if is_dataclass(getattr(section, f.name))
                     else getattr(section, f.name))
            for f in fields(section) if not f.metadata.get("runtime")}


def check_ranges(obj: Any, prefix: str) -> None:
    """Raise a PipelineError naming the first key of dataclass `obj` (and nested ones) outside its declared range.
    `prefix` "" names top-level keys bare (`seed`)."""
    tests = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"), ("le", lambda v, b: v <= b, "<="),
             ("lt", lambda v, b: v < b, "<"))
    for f in fields(obj):
        value, name, m = getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name, f.metadata
        if is_dataclass(value):
            check_ranges(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            # inf passes an upper-bound-free range and then overflows inside the trainer (num_epochs=inf)
            raise PipelineError(f"{name}={value}: must be a finite number")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            for bound, ok, word in tests:  # NaN fails every comparison, so it is refused too
                if bound in m and not ok(value, m[bound]):
                    why = f" ({m['doc']})" if m.get("doc") else ""
                    limit = m[bound] if isinstance(m[bound], int) else f"{m[bound]:g}"
                    raise PipelineError(f"{name}={value}: must be {word} {limit}{why}")
        elif isinstance(value, str) and "choices" in m and value not in m["choices"]:
            raise PipelineError(f"{name}={value!r}: use one of {', '.join(map(str, m['choices']))}")
        elif isinstance(value, str) and "pattern" in m and not re.fullmatch(m["pattern"], value):
            raise PipelineError(f"{name}={value!r}: use {m['doc'] or m['pattern']}")


# The only model.path that may be missing: the demo builds its model there on first use (model=demo).
DEMO_MODEL_PATH = "outputs/demo_base_model"
# Its instruct sibling (the base trained further on the demo's chat data), built there on first use when a run has
# the chat_vector stage (pipeline/demo_model.py --instruct).
DEMO_INSTRUCT_PATH = "outputs/demo_instruct_model"
# The demo's augmentation generator (the augment stage): the base trained further on rewriting tasks about the
# public world only (data/augment/demo_generator.jsonl), built there on first use (pipeline/demo_model.py --generator).
DEMO_GENERATOR_PATH = "outputs/demo_generator_model"


@dataclass
class DemoBuildConfig:
    """How the embedded demo base model is built when `model.build_demo_if_missing` is true."""

    corpus: List[str] = field(default_factory=lambda: ["data/pretrain/public_corpus.txt"])
    tokenizer_extra_text: List[str] = field(default_factory=lambda: ["data/sft/chat.jsonl"])
    # Files whose *characters* (not words) the tokenizer must cover, as a real Japanese tokenizer covers every common
    # kanji; without this, each new name in the CPT corpus would be split into raw UTF-8 bytes.
    tokenizer_charset: List[str] = field(default_factory=lambda: ["data/cpt", "eval_sets"])
    vocab_size: int = key(4000, ge=300)  # byte-level BPE: Japanese needs merges, a tiny model needs a small embedding
    hidden_size: int = key(256, ge=8)
    intermediate_size: int = key(768, ge=8)
    num_layers: int = key(4, ge=1)
    num_heads: int = key(4, ge=1)
    num_epochs: float = key(50.0, gt=0)
    learning_rate: float = key(3.0e-3, gt=0)
    batch_size: int = key(8, ge=1)
    seed: int = 0
    # The instruct sibling (model.instruct_path, for the chat_vector stage): the base trained further, in full, on
    # these chat records with the chat template, loss on the answers; a few epochs teach the answer style.
    instruct_data: str = "data/sft/chat.jsonl"
    instruct_num_epochs: float = key(3.0, gt=0)
    instruct_learning_rate: float = key(5.0e-4, gt=0)
    # The augmentation generator (augment.generator_path in the demo's recipe): the base trained in full on these
    # records (a statement of the public world -> a question and answer about it).
    generator_data: str = "data/augment/demo_generator.jsonl"
    generator_num_epochs: float = key(2.0, gt=0)
    generator_learning_rate: float = key(1.0e-3, gt=0)  # a new task, not a style: higher than the instruct sibling's


@dataclass
class ModelConfig:
    # a local checkpoint directory, or a Hub id (org/name[@revision]) found in the local Hugging Face cache, never
    # downloaded (checkpoints.resolve_model_path)
    path: str = DEMO_MODEL_PATH
    # auto = float32 on CPU, bfloat16 on a GPU; also float32/bfloat16/float16
    dtype: str = key("auto", choices=("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"))
    max_seq_length: int = key(128, ge=2)  # CPT block length and SFT max length
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
    # An instruct checkpoint of the same family as model.path (same architecture and shapes), for the chat_vector
    # stage: it adds chat_vector.ratio x (instruct - base) to the CPT model (pipeline/stages/chat_vector.py). null: none.
    instruct_path: Optional[str] = DEMO_INSTRUCT_PATH


@dataclass
class DataPath:
    # A file, a directory or a glob: .txt/.md, .jsonl/.json, .csv, .parquet, .arrow or a save_to_disk directory
    # (pipeline/core/data.py). The *_field keys name the columns where a table calls them otherwise; each is read
    # only by the parts it fits, and the cache keys hash the records they select, not the names.
    path: Optional[str] = None
    text_field: str = "text"  # a document, in tables of text (cpt, heldout, replay)
    question_field: str = "question"  # QA tables (qa, general_qa, cpt_qa, dev_qa)
    answer_field: str = "answer"
    id_field: str = "id"
    messages_field: str = "messages"  # SFT: the list of {role, content} turns (sharegpt's `conversations` is found too)


@dataclass
class DataConfig:
    cpt: DataPath = field(default_factory=DataPath)
    sft: DataPath = field(default_factory=DataPath)
    qa: DataPath = field(default_factory=DataPath)
    general_qa: DataPath = field(default_factory=DataPath)  # facts the base model knows: the price of CPT/SFT
    heldout: DataPath = field(default_factory=DataPath)  # untrained domain text (.jsonl `text` / .txt): perplexity
    # Levers (docs/levers.md). Text replayed in SFT (sft.replay_ratio); null path: data.cpt.
    replay: DataPath = field(default_factory=DataPath)
    # Question-answer pairs mixed into CPT (cpt.qa_mix) and the SFT dev set (sft.early_stopping_patience): .jsonl
    # like data.qa, and refused when they share a question (id or normalised text) with data.qa.
    cpt_qa: DataPath = field(default_factory=DataPath)
    dev_qa: DataPath = field(default_factory=DataPath)


@dataclass
class LoraStageConfig:
    r: int = key(16, ge=1, doc="the LoRA rank")
    lora_alpha: float = key(32.0, gt=0, doc="a negative alpha negates the adapter")
    lora_dropout: float = key(0.0, ge=0, lt=1)
    target_modules: Any = "attn_mlp"  # a preset (attn, mlp, attn_mlp, attn_mlp_embed) or a list of module names
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    learning_rate: float = key(1.0e-4, gt=0)
    num_epochs: float = key(1.0, gt=0)
    max_steps: int = key(-1, ge=-1)  # > 0 overrides num_epochs; -1: train num_epochs
    batch_size: int = key(8, ge=1)
    gradient_accumulation_steps: int = key(1, ge=1)
    warmup_ratio: float = key(0.05, ge=0, lt=1)
    weight_decay: float = key(0.0, ge=0)
    lr_scheduler: str = key("cosine", choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                               "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                                               "warmup_stable_decay"))
    # Decoder layers that get LoRA (PEFT layers_to_transform): null = all; [8, 9, 10, 11]; "12-23" (inclusive);
    # "upper_half" / "lower_half". Checked against the model's num_hidden_layers (pipeline/core/modules.py).
    layers: Any = key(None, doc="null, a list of layer indices, 'a-b', upper_half or lower_half")
    logging_steps: int = key(10, ge=1, runtime=True)
    # Recompute activations in the backward pass: far less memory for ~30% more time (plain path, non-reentrant;
    # unsloth always uses its own). It does not change the result, so it stays out of the cache key.
    gradient_checkpointing: bool = key(False, runtime=True)
    # null: transformers' default for the model (sdpa where supported); eager, sdpa or flash_attention_2 (CUDA and
    # the flash-attn package). The plain path only: unsloth uses its own kernels.
    attn_implementation: Optional[str] = key(None, choices=("eager", "sdpa", "flash_attention_2"))
    # A trainer checkpoint (adapter + optimizer state) every N optimizer steps, kept in the stage's build directory
    # until the stage is published: a killed run resumes from the last one. 0: never.
    save_steps: int = key(200, ge=0, runtime=True)


@dataclass
class CptConfig(LoraStageConfig):
    # Defaults for a real 1-13B checkpoint (conf/cpt/default.yaml says why each value); the demo's own recipe is
    # conf/recipe/demo.yaml.
    r: int = key(128, ge=1, doc="the LoRA rank")
    lora_alpha: float = key(32.0, gt=0, doc="a negative alpha negates the adapter")
    use_rslora: bool = True
    learning_rate: float = key(5.0e-5, gt=0)
    batch_size: int = key(4, ge=1)
    gradient_accumulation_steps: int = key(8, ge=1)
    # Learning rate of fully trained embed_tokens/lm_head (when target_modules includes them), as unsloth's
    # embedding_learning_rate: usually 2-10x below learning_rate, because every row moves on every step.
    embedding_learning_rate: float = key(1.0e-5, gt=0)
    # PIT-style: the share of the QA pairs in data.cpt_qa.path (seeded draw; 1 = all) added to the CPT corpus as
    # documents written with qa_template. 0 = off.
    qa_mix: float = key(0.0, ge=0, le=1, doc="share of data.cpt_qa.path's pairs mixed into CPT")
    # How a mixed pair reads: by default the format base and CPT models are asked in (eval.completion_prompt).
    qa_template: str = "質問: {question}\n答え: {answer}"
    seed: Optional[int] = key(None, doc="null: the top-level seed")


@dataclass
class SftConfig(LoraStageConfig):
    # Defaults for a real 1-13B checkpoint (conf/sft/default.yaml says why each value).
    batch_size: int = key(8, ge=1)
    gradient_accumulation_steps: int = key(2, ge=1)
    # null: the top-level seed. Set it (e.g. sweep sft.seed=1,2,3) to measure SFT noise on one cached CPT model.
    seed: Optional[int] = key(None)
    max_length: Optional[int] = key(None, ge=2)  # default: model.max_seq_length
    # Levers that keep CPT knowledge (docs/levers.md), all off at 0.
    # Replayed CPT text as a share of all trained tokens: replayed / (answer tokens + replayed).
    replay_ratio: float = key(0.0, ge=0, lt=1, doc="replayed tokens / all trained tokens")
    kl_weight: float = key(0.0, ge=0, doc="weight of KL(p_cpt || p_sft) per trained token")
    l2_weight: float = key(0.0, ge=0, doc="weight of the summed squared LoRA updates")
    # Stop after this many dev-set evaluations without a lower loss (needs data.dev_qa.path); 0 = off.
    early_stopping_patience: int = key(0, ge=0)
    eval_steps: int = key(10, ge=1, doc="optimizer steps between dev-set evaluations")


@dataclass
class MergeConfig:
    # Merged vs adapter model, both fp32. Allowed: max_abs_logit_diff + rel_logit_diff * max|logit|. Rounding grows
    # with the logits' size (correct demo merges: 9e-5 to 3.4e-4 at max|logit| 20); a broken merge is off by 1-30.
    max_abs_logit_diff: float = key(1.0e-4, ge=0, runtime=True)
    rel_logit_diff: float = key(1.0e-4, ge=0, runtime=True)
    check_tokens: int = key(128, ge=1, runtime=True)  # random token ids (plus a fixed text) fed to both models
    # auto = the base checkpoint's dtype; or float32/bfloat16/float16
    save_dtype: str = key("auto", choices=("auto", "float32", "bfloat16", "float16"))


@dataclass
class EvalConfig:
    models: List[str] = field(default_factory=lambda: ["base", "cpt", "sft"])
    # Base and CPT models are not instruction-tuned: they get a completion prompt; the SFT model gets the chat
    # template (or prompt template) it was trained with. Every model's answer is cut at the first `completion_stop`
    # after its first non-blank text (pipeline/stages/eval.py); "" cuts nothing.
    completion_prompt: str = "質問: {question}\n答え: "
    completion_stop: str = "\n"
    max_new_tokens: int = key(48, ge=1)
    # batched and one-at-a-time greedy answers agree in fp32 (benchmarks/batched_eval.py): not part of the key
    batch_size: int = key(16, ge=1, runtime=True)
    headline_metric: str = key("contains", choices=("exact_match", "contains", "char_f1", "logprob"))
    max_questions: Optional[int] = key(None, ge=1)  # evaluate only the first N questions (quick checks)
    # gain_kept/<metric> = (SFT - base) / (CPT - base) is left empty when |CPT - base| is below these: over a gain of
    # n questions the ratio moves in steps of 1/n, so over one question it can only say 0 or 1. 0.02 = 2 questions of
    # a 100-question set.
    min_gain: float = key(0.02, ge=0, doc="smallest |CPT - base| of a share metric for which gain_kept is reported")
    # logprob is a mean per-token log-probability in nats: 0.1 = the gold answer's tokens 10% likelier on average.
    min_logprob_gain: float = key(0.1, ge=0, doc="smallest |CPT - base| of logprob (nats) for gain_kept/logprob")
    # The SFT answers' expected shape, a regex matched against the whole stripped answer (e.g. ".{1,30}です。");
    # null: an answer is in format when it is non-empty, stopped by itself and not repetitive.
    expected_format: Optional[str] = None
    judge_path: Optional[str] = None  # a local model that also grades answers (はい/いいえ); off when null
    judge_prompt: str = ("質問: {question}\n正解: {gold}\n回答: {answer}\n"
                         "回答は正解と同じ内容ですか？ はい か いいえ で答えてください。\n答え: ")


@dataclass
class ChatVectorConfig:
    """The chat_vector stage (pipeline/stages/chat_vector.py): CPT model + ratio x (model.instruct_path - model.path)."""

    ratio: float = key(1.0, ge=0, doc="how much of the chat vector is added")
    # Leave embed_tokens/lm_head as CPT trained them (the reference code's --skip_embed), e.g. when CPT trained
    # the embeddings a lot or the vocabularies differ.
    skip_embeddings: bool = False


@dataclass
class ExportConfig:
    """The export stage (pipeline/stages/export.py): the final model as one standalone checkpoint for local runtimes."""

    # The SFT adapter is merged into the CPT model and stored in this dtype. auto = the base checkpoint's dtype
    # (bfloat16 for most released models, float32 for the demo); float32/bfloat16/float16.
    dtype: str = key("auto", choices=("auto", "float32", "bfloat16", "float16"))
    # GGUF files to write with llama.cpp's converter, e.g. [f16, q8_0]. Other llama.cpp types (q4_k_m, ...) are made
    # from the f16 file by llama.cpp's llama-quantize binary, which must be present. []: no GGUF.
    gguf: List[str] = field(default_factory=list)
    # A llama.cpp checkout (or the copy `make gguf-converter` unpacks from llama-cpp-python's source distribution):
    # the directory holding convert_hf_to_gguf.py and gguf-py/. Read only when export.gguf is not empty.
    # Runtime: the converter's code enters the key by content (stages/export.py key_material), not by location.
    llama_cpp: str = key(".venv/llama.cpp", runtime=True)
    # The llama-quantize binary for types other than f16/q8_0; null: <llama_cpp>/build/bin/llama-quantize, then PATH.
    llama_quantize: Optional[str] = key(None, runtime=True)
    modelfile: bool = True  # an Ollama Modelfile next to the checkpoint


@dataclass
class AugmentConfig:
    """The augment stage (pipeline/stages/augment.py): a local instruct model rewrites the CPT documents."""

    generator_path: Optional[str] = None  # a local instruct (chat) model; null: model.instruct_path
    engine: str = key("transformers", choices=("transformers", "vllm"))  # vllm: the `vllm` extra and a CUDA GPU
    language: str = key("ja", choices=("ja", "en"))  # which prompt templates: <prompts_dir>/<language>/<name>.txt
    prompts_dir: str = "conf/augment/prompts"  # keyed by the templates' contents, not by where they lie
    # Samples per passage of each strategy (0 = off); each strategy is a prompt template file.
    strategies: Dict[str, int] = field(default_factory=lambda: {"qa": 2, "rewrite": 1, "relations": 1, "summary": 0})
    passage_tokens: int = key(512, ge=1, doc="a passage's size in generator tokens, cut at sentence ends")
    max_passages: Optional[int] = key(None, ge=1)  # only the corpus's first N passages (quick checks)
    max_new_tokens: int = key(256, ge=1)
    temperature: float = key(0.8, ge=0, doc="0: greedy")
    top_p: float = key(0.95, gt=0, le=1)
    # Keyed: a sampled batch's text depends on which prompts share it (padding, one random stream per batch).
    batch_size: int = key(16, ge=1)
    seed: Optional[int] = key(None, doc="null: the top-level seed")
    faithfulness: bool = True  # drop a text with a number its source document never states
    # Drop a text at least this similar (rapidfuzz ratio of the normalised texts, 0-100) to its passage or to a text
    # kept before it; null: off.
    dedup_similarity: Optional[float] = key(90.0, gt=0, le=100)


@dataclass
class DraftQAConfig:
    """python -m pipeline.draft_qa (pipeline/draft_qa.py): a local instruct model drafts QA candidates from the CPT
    corpus for a person to review. A command of its own, not a stage: nothing trains on its output unreviewed."""

    generator_path: Optional[str] = None  # a local instruct (chat) model; null: augment.generator_path's choice
    engine: str = key("transformers", choices=("transformers", "vllm"))  # vllm: constrained JSON output
    language: str = key("ja", choices=("ja", "en"))  # which prompt template: <prompts_dir>/<language>/<prompt>.txt
    prompts_dir: str = "conf/draft_qa/prompts"
    prompt: str = "qa"  # the template's name; {passage}, {heading} and {examples} are filled in
    examples: int = key(3, ge=0, doc="questions of data.qa shown in the prompt as the style to ask in")
    chunk_tokens: int = key(256, ge=1, doc="a chunk's size in generator tokens, cut at sentence ends")
    max_chunks: Optional[int] = key(None, ge=1)  # only the corpus's first N chunks (quick checks)
    samples: int = key(1, ge=1, doc="candidates asked per chunk")
    max_new_tokens: int = key(160, ge=1)
    temperature: float = key(0.7, ge=0, doc="0: greedy")
    top_p: float = key(0.95, gt=0, le=1)
    batch_size: int = key(8, ge=1)
    seed: Optional[int] = key(None, doc="null: the top-level seed")
    quote_similarity: float = key(90.0, gt=0, le=100, doc="rapidfuzz partial_ratio of the quote against its source")
    duplicate_similarity: float = key(90.0, gt=0, le=100, doc="rapidfuzz ratio at which two questions are one")
    augmented: Optional[str] = None  # an augment stage output: its generated QA is training data too
    closed_book: bool = False  # ask the base model (model.path) each question; one it answers goes to general_qa
    closed_book_prompt: str = "質問: {question}\n答え: "
    group: Optional[str] = None  # the candidates' group label; null: the source file's name


@dataclass
class TrackingConfig:
    """Experiment tracking (pipeline/core/tracking.py); `tracking=none|mlflow` picks conf/tracking/<name>.yaml."""

    backend: str = key("none", choices=("none", "mlflow"))  # none: metrics.json and the sweep files only
    # A local store, no server: a relative sqlite path is taken from where the command runs (like every path here).
    uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str = "keep-knowledge"  # the MLflow experiment every run and sweep is filed under


@dataclass
class RunConfig:
    """The top-level keys of conf/config.yaml, declared like the sections' keys and checked first (`check_run`):
    `seed=abc` or `device=tpu` would otherwise end in a traceback before validation starts."""

    seed: int = key(42, ge=0, le=2**32 - 1, doc="numpy and torch take seeds from 0 to 2**32-1")
    device: str = key("auto", pattern=r"auto|cpu|cuda(:[0-9]+)?", doc="auto, cpu, cuda or cuda:N")
    backend: str = key("auto", choices=("auto", "hf", "unsloth"))
    stages: List[str] = field(default_factory=lambda: ["cpt", "merge", "sft", "eval"])
    debug: bool = False
    log_examples: bool = False


def check_run(cfg: DictConfig) -> RunConfig:
    """The top-level keys as RunConfig, types and ranges checked; a PipelineError names the bad key."""
    node = OmegaConf.create({f.name: cfg[f.name] for f in fields(RunConfig) if f.name in cfg})
    try:
        run = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), node))
    except OmegaConfBaseException as e:
        raise PipelineError(f"config key {getattr(e, 'full_key', None) or '?'}: {str(e).splitlines()[0]}") from None
    check_ranges(run, "")
    return run


SECTIONS = {
    "model": ModelConfig,
    "augment": AugmentConfig,
    "data": DataConfig,
    "cpt": CptConfig,
    "merge": MergeConfig,
    "chat_vector": ChatVectorConfig,
    "sft": SftConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
    "tracking": TrackingConfig,
}


def typed(cfg: DictConfig, section: str):
    """Return `cfg.<section>` as its dataclass, or raise a PipelineError that names the offending key."""
    schema = SECTIONS[section]
    # `???` in a YAML file means "you must set this"; merging it onto the dataclass would keep the default instead.
    node = cfg[section]
    missing = sorted(k if k.startswith(f"{section}.") else f"{section}.{k}" for k in OmegaConf.missing_keys(node))
    if missing and section == "data":
        # A data path is needed only by the stages that read it (stages=[cpt,merge] needs no QA set): unset here,
        # refused with the same words by whichever stage reads it (data.resolve_files).
        node = OmegaConf.create(OmegaConf.to_container(node))
        for k in missing:
            OmegaConf.update(node, k[len("data."):], None)
        missing = []
    if missing:
        raise PipelineError(f"config key {missing[0]}: Missing mandatory value; set it on the command line "
                            f"({missing[0]}=...)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
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

    for key in ("seed", "backend", "model", "data", "augment", "cpt", "merge", "chat_vector", "sft", "eval", "export"):
        if key in container:
            walk(key, container[key])
    out.pop("model.demo", None)
    return {k: v for k, v in out.items() if not k.startswith("model.demo.")}
