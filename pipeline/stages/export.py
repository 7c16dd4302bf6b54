"""Stage export — the final model as one standalone checkpoint, ready for local runtimes.

    python -m pipeline.run 'stages=[cpt,merge,sft,eval,export]'
    python -m pipeline.run 'stages=[export]' inputs.cpt_model=<run>/cpt_model inputs.sft_adapter=<run>/sft_adapter

The SFT adapter is merged into the CPT model (or the chat-vector model it was trained on) by the CPT merge's own
streamed, verified merge (pipeline/stages/merge.py): PEFT's reference logits, PEFT's merge, the saved file reloaded,
every input-embedding row; stored in export.dtype. Without SFT (stages with chat_vector only) the chat-vector model is
the final model and is copied, cast to export.dtype. The output directory:

    model/          safetensors, config, tokenizer with the chat template SFT trained with (a prompt_template turned
                    into an equivalent chat template), generation_config.json whose eos_token_id lists the tokens
                    that end an answer, merge_check.json, and README.md (the model card)
    Modelfile       for Ollama: FROM ./model, the chat template translated to Go (pipeline/core/ollama.py), stops
    gguf/           with export.gguf: llama.cpp's converter's files, each verified (pipeline/core/gguf_export.py)
    export_check.json   what was checked, with the figures

When the run evaluated the SFT model, the exported checkpoint is loaded with plain transformers and asked every
question eval asked, through its own chat template and generation config: its greedy answers must be eval's
(`answers_same_as_eval`). A difference is reported as a warning, not an error: a bf16 export of an fp32-evaluated
model may legitimately flip near-ties.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import torch

from pipeline.core.checkpoints import load_model, load_tokenizer
from pipeline.core.config import EvalConfig, ExportConfig, MergeConfig, ModelConfig, cache_settings
from pipeline.core.devices import resolve_device, resolve_dtype
from pipeline.core.outputs import COMPLETE_MARKER, PipelineError, atomic_output, write_json
from pipeline.core.prompts import chat_template_from_prompt_template, chat_text, use_recorded_prompt_format

log = logging.getLogger(__name__)

MODEL_DIR = "model"
# Markers for the answer whose end the chat template writes (stop_token_ids): plain words no template rewrites.
_QUESTION, _ANSWER = "QUESTIONQZXMARK", "ANSWERQZXMARK"


def key_material(cfg: ExportConfig) -> dict:
    """What the export depends on besides the models it merges (run.py adds those): its settings and, when it
    writes GGUF files, the converter's code by content (its location is not keyed: export.llama_cpp is runtime)."""
    from pipeline.cache import fingerprint_files
    from pipeline.core.gguf_export import converter_files

    return {"export": cache_settings(cfg),
            "converter": fingerprint_files(converter_files(cfg.llama_cpp)) if cfg.gguf else None}


# --- the chat format and the tokens that end an answer ---------------------------------------------------------------

def final_tokenizer(model_dir, adapter_dir: Optional[str], model_cfg: ModelConfig):
    """The tokenizer as SFT trained with it: the format recorded next to the adapter (or the chat-vector model),
    a prompt_template turned into an equivalent chat template, so that every runtime asks the model the same way."""
    source = adapter_dir or model_dir
    tok = load_tokenizer(source, model_cfg.trust_remote_code)
    prompt_template = use_recorded_prompt_format(tok, source, model_cfg)
    if not tok.chat_template:
        tok.chat_template = chat_template_from_prompt_template(prompt_template)
    return tok


def stop_token_ids(tok) -> List[int]:
    """EOS and the special token the chat template writes right after an answer (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>), where that is another token: a runtime must stop at either."""
    text = chat_text([{"role": "user", "content": _QUESTION}, {"role": "assistant", "content": _ANSWER}], tok,
                     add_generation_prompt=False)
    after = text.split(_ANSWER, 1)[1] if _ANSWER in text else ""
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    ids = [tok.eos_token_id]
    first = next((i for i in tok(after, add_special_tokens=False)["input_ids"] if i in special), None)
    if first is not None and first not in ids:
        ids.append(first)
    return ids


def write_generation_config(model_dir: Path, tok, stops: List[int]) -> dict:
    """generation_config.json with every answer-ending token as eos_token_id (those the base listed stay)."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(str(model_dir))
    listed = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = list(dict.fromkeys(stops + [i for i in listed if i is not None]))
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    gen.save_pretrained(str(model_dir))
    return {"eos_token_id": eos, "pad_token_id": tok.pad_token_id}


# --- the checkpoint --------------------------------------------------------------------------------------------------

def copy_checkpoint(src: Path, dst: Path, dtype: str) -> None:
    """A checkpoint without an adapter to merge (the chat-vector model), its floating tensors cast to `dtype`, shard
    by shard (auto: as stored). Verified by the logit check the caller runs on the reload."""
    from safetensors.torch import load_file, save_file

    from pipeline.stages.merge import _save_dtype

    target = _save_dtype(dtype, str(src))
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name in (COMPLETE_MARKER, "chat_vector.json", "merge_check.json") or f.is_dir():
            continue
        if f.suffix == ".safetensors":
            tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        else:
            shutil.copy2(f, dst / f.name)
    config = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = str(target).replace("torch.", "")
    config.pop("torch_dtype", None)
    write_json(dst / "config.json", config)


@torch.no_grad()
def check_copy(src: Path, dst: Path, dev: torch.device, tok, tolerance: float) -> dict:
    """The copied checkpoint's logits against the source's, both in float32 (the cast is reported, not checked)."""
    from pipeline.stages.merge import _load_fp32, _logits, _release, check_sample

    ids = check_sample(tok, 128)
    logits = {}
    for name, path in (("source", src), ("export", dst)):
        model = _load_fp32(path, dev, False)
        logits[name] = _logits(model, ids, dev)
        del model
        _release(dev)
    diff = (logits["export"] - logits["source"]).abs().max().item()
    return {"copied_from": str(src), "max_abs_logit_diff": diff, "max_abs_logit": logits["source"].abs().max().item(),
            "tolerance_note": f"a float32 copy must be exact; a cast moves logits (tolerance {tolerance:g} applies "
                              f"to float32 only)"}


# --- the answers check -----------------------------------------------------------------------------------------------

def answers_check(model_dir: Path, eval_dir: Optional[str], qa_path: Optional[str], eval_cfg: EvalConfig,
                  model_cfg: ModelConfig, dev: torch.device) -> Optional[dict]:
    """The exported checkpoint, loaded with plain transformers, asked every question eval asked the SFT model, through
    its own chat template and generation config; its greedy answers against eval's (None: eval has no SFT answers)."""
    from pipeline.core.data import load_qa
    from pipeline.stages.eval import _stop_ids, generate

    answers_file = Path(eval_dir) / "answers.jsonl" if eval_dir else None
    if not answers_file or not answers_file.is_file() or not qa_path:
        return None
    rows = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows or "sft" not in rows[0]:
        return None
    gold = {r["id"]: r["sft"]["answer"] for r in rows}
    qa = [q for q in load_qa(qa_path) if q.id in gold]
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, resolve_dtype(model_cfg.dtype, dev), dev).eval()
    prompts = [chat_text([{"role": "user", "content": q.question}], tok) for q in qa]
    t0 = time.time()
    got = generate(model, tok, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, dev, _stop_ids(tok, model),
                   stop_string=eval_cfg.completion_stop or None, stop_at_cut=False)
    del model
    differ = [{"id": q.id, "eval": gold[q.id], "export": text} for q, (text, _) in zip(qa, got) if text != gold[q.id]]
    return {"questions": len(qa), "answers_same_as_eval": len(qa) - len(differ), "differing": differ[:20],
            "seconds": round(time.time() - t0, 2)}


# --- the model card --------------------------------------------------------------------------------------------------

def eval_table(eval_dir: Optional[str]) -> Optional[str]:
    """The eval's share metrics per model with 95% bootstrap intervals over the questions (markdown), or None."""
    import numpy as np

    from pipeline.sweep.stats import bootstrap_interval

    if not eval_dir or not (Path(eval_dir) / "answers.jsonl").is_file():
        return None
    rows = [json.loads(x) for x in (Path(eval_dir) / "answers.jsonl").read_text(encoding="utf-8").splitlines()
            if x.strip()]
    models = [m for m in ("base", "cpt", "sft") if rows and m in rows[0]]
    metrics = ("exact_match", "contains", "char_f1")
    lines = ["| model | " + " | ".join(metrics) + " | logprob |", "|---" * (len(metrics) + 2) + "|"]
    for m in models:
        cells = []
        for name in metrics:
            res = bootstrap_interval([np.array([r[m][name] for r in rows], dtype=float)],
                                     lambda x, axis=-1: np.mean(x, axis=axis), n_resamples=2000)
            ci = f" [{res['ci_low']:.3f}, {res['ci_high']:.3f}]" if res["ci_low"] is not None else ""
            cells.append(f"{res['value']:.3f}{ci}")
        cells.append(f"{np.mean([r[m]['logprob'] for r in rows]):.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n{len(rows)} questions; in brackets the 95% bootstrap interval over the "
                               f"questions (2,000 draws). `sft` is the model exported here.")


def model_card(info: dict, eval_dir: Optional[str], check: dict) -> str:
    """README.md of the exported model: where it comes from, how every stage was set, what the eval measured."""
    from pipeline import __version__

    lines = [f"# {info.get('name') or 'keep-knowledge export'}", "",
             "A standalone checkpoint made by keep-knowledge (`python -m pipeline.run ... stages=[...,export]`): the "
             "base model, continually pretrained on a confidential corpus (CPT, merged), then instruction-tuned "
             "(SFT, merged here). It loads with plain transformers (`AutoModelForCausalLM.from_pretrained`).", "",
             "| | |", "|---|---|",
             f"| base model | `{info.get('base_model')}` (identity `{info.get('base_identity')}`) |",
             f"| CPT corpus fingerprint | `{info.get('corpus_fingerprint')}` |",
             f"| exported | {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} |",
             f"| pipeline version | {__version__} |",
             f"| dtype | {check.get('dtype')} |",
             f"| stop tokens (generation_config eos_token_id) | {check.get('stop_tokens')} |", ""]
    table = eval_table(eval_dir)
    if table:
        lines += ["## Evaluation on the QA set", "", table, ""]
    answers = check.get("answers")
    if answers:
        lines += [f"This checkpoint, loaded with plain transformers, gives the same greedy answer as the evaluated SFT "
                  f"model on {answers['answers_same_as_eval']} of {answers['questions']} questions.", ""]
    lines += ["## Settings of every stage", "", "Each stage's cache-key material: its settings, the fingerprints "
              "of the files it read and the identity of the stage output it built on.", ""]
    for stage, material in (info.get("stages") or {}).items():
        lines += [f"### {stage}", "", "```json", json.dumps(material, ensure_ascii=False, indent=1, default=str),
                  "```", ""]
    return "\n".join(lines)


def lineage(materials: Dict[str, dict], cache_root: Optional[str]) -> Dict[str, dict]:
    """Every stage behind the export: this run's materials, and for stage outputs taken from the cache (inputs.*),
    the material their cache entry recorded (`<cache>/<stage>/<key>.json`), followed back to the first stage."""
    found = dict(materials)
    todo = list(materials.values())
    while todo and cache_root:
        for value in todo.pop().values():
            if isinstance(value, str) and value.startswith("cache:"):
                stage, _, key = value[len("cache:"):].partition("/")
                file = Path(cache_root) / stage / f"{key}.json"
                if stage not in found and file.is_file():
                    found[stage] = json.loads(file.read_text(encoding="utf-8"))
                    todo.append(found[stage])
    order = ["cpt", "merge", "chat_vector", "sft", "eval", "export"]
    return {s: found[s] for s in sorted(found, key=lambda s: order.index(s) if s in order else 99)}


# --- the stage -------------------------------------------------------------------------------------------------------

def export_model(cfg: ExportConfig, merge_cfg: MergeConfig, model_cfg: ModelConfig, base_dir: str | Path,
                 adapter_dir: Optional[str | Path], out_dir: str | Path, device: str = "auto",
                 eval_cfg: Optional[EvalConfig] = None, qa_path: Optional[str] = None,
                 eval_dir: Optional[str] = None, info: Optional[dict] = None) -> Path:
    """Merge `adapter_dir` into the model at `base_dir` (or copy that model when there is no adapter), and publish the
    checkpoint, its Modelfile and GGUF files at `out_dir` (module docstring)."""
    from pipeline.core import gguf_export
    from pipeline.core.ollama import Untranslatable, modelfile
    from pipeline.stages.merge import merge_adapter

    out_dir, base_dir = Path(out_dir), Path(base_dir)
    dev = resolve_device(device)
    if cfg.gguf:
        gguf_export.check_request(cfg)
    tok = final_tokenizer(base_dir, str(adapter_dir) if adapter_dir else None, model_cfg)
    stops = stop_token_ids(tok)
    check: Dict[str, object] = {}
    with atomic_output(out_dir) as tmp:
        model_dir = tmp / MODEL_DIR
        if adapter_dir:
            merge_adapter(replace(merge_cfg, save_dtype=cfg.dtype), replace(model_cfg, path=str(base_dir)),
                          adapter_dir, model_dir, device)
            merged = json.loads((model_dir / "merge_check.json").read_text(encoding="utf-8"))
            check["merge"] = {k: merged[k] for k in ("max_abs_logit_diff", "tolerance", "reload_max_abs_logit_diff",
                                                     "save_dtype", "save_dtype_logit_drift")}
        else:
            copy_checkpoint(base_dir, model_dir, cfg.dtype)
            check["copy"] = check_copy(base_dir, model_dir, dev, tok, merge_cfg.max_abs_logit_diff)
            if check["copy"]["max_abs_logit_diff"] and json.loads((model_dir / "config.json").read_text())[
                    "dtype"] == "float32":
                raise PipelineError(f"export: the float32 copy of {base_dir} gives other logits (max |diff| "
                                    f"{check['copy']['max_abs_logit_diff']:.3g}); nothing was published")
        (model_dir / COMPLETE_MARKER).unlink(missing_ok=True)  # a deployable directory, not a stage output
        tok.save_pretrained(model_dir)  # the chat template SFT trained with
        check["dtype"] = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("dtype")
        check["generation_config"] = write_generation_config(model_dir, tok, stops)
        check["stop_tokens"] = tok.convert_ids_to_tokens(stops)
        if eval_cfg is not None:
            check["answers"] = answers_check(model_dir, eval_dir, qa_path, eval_cfg, model_cfg, dev)
            a = check["answers"]
            if a:
                log.info("export: the exported checkpoint answers %d of %d questions as eval's SFT model did (%.1fs)",
                         a["answers_same_as_eval"], a["questions"], a["seconds"])
                if a["answers_same_as_eval"] < a["questions"]:
                    log.warning("export: %d of %d greedy answers differ from eval's SFT model's (export_check.json "
                                "lists them; export.dtype=%s)", a["questions"] - a["answers_same_as_eval"],
                                a["questions"], check["dtype"])
        if cfg.modelfile:
            try:
                mf = modelfile(lambda messages, gen: chat_text(messages, tok, gen), check["stop_tokens"],
                               f"./{MODEL_DIR}")
                (tmp / "Modelfile").write_text(mf["text"], encoding="utf-8")
                check["modelfile"] = "written"
            except (Untranslatable, ValueError) as e:
                check["modelfile"] = f"not written: {e}"
                log.warning("export: no Ollama Modelfile: the chat template cannot be translated to Ollama's "
                            "template language (%s)", e)
        if cfg.gguf:
            questions = []
            if qa_path:
                from pipeline.core.data import load_qa

                questions = [q.question for q in load_qa(qa_path)]
            check["gguf"] = gguf_export.export_gguf(cfg, model_dir, tmp / "gguf", tok, questions, dev)
        info = dict(info or {})
        (model_dir / "README.md").write_text(model_card(info, eval_dir, check), encoding="utf-8")
        write_json(tmp / "export_check.json", check)
    return out_dir
