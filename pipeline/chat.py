"""Put questions to the base, CPT and SFT models of a run, side by side.

    python -m pipeline.chat outputs/runs/<run>                 # type a question, read three answers as they come
    python -m pipeline.chat outputs/sweeps/<time>/<n> --question-file questions.jsonl   # a table of answers

RUN_DIR is a run directory or a sweep's job directory: its config.yaml names the base model, its links the CPT model,
the SFT adapter and, after the export stage, the exported model, which then answers in SFT's place. Each model is
asked as eval asks it: base and CPT with eval.completion_prompt, the SFT model through the chat template (or prompt
template) its adapter records in prompt_format.json, the export through its own chat template. Answers are greedy,
streamed as they are generated, and cut by eval's rule (the first non-blank line), so they are the answers of
answers.jsonl for the same question.

Each model is loaded once: without an export, the CPT answers come from the SFT model with its adapter switched off.
`--question-file` takes a .jsonl file with a `question` field per line (a QA set) or a text file, one question per
line, and prints a markdown table. End of input (Ctrl-D) or Ctrl-C ends the session (exit status 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, TextIO

import pipeline  # noqa: F401  (the offline environment before any Hugging Face import)

from pipeline.core.outputs import PipelineError


@dataclass
class Speaker:
    """One model as the chat asks it."""

    name: str
    model: object
    tok: object
    prompt: Callable[[str], str]
    stop_ids: List[int]
    adapter_off: bool = False  # the CPT model's answers from the SFT model with the adapter switched off
    loaded_from: List[str] = field(default_factory=list)


def _link(run_dir: Path, name: str) -> Optional[Path]:
    path = run_dir / name
    return path if path.is_dir() else None


def load_speakers(run_dir: Path, device: str = "cpu", models=("base", "cpt", "sft")) -> tuple:
    """(the run's models, each loaded once (module docstring), the run's eval settings)."""
    from omegaconf import OmegaConf
    from peft import PeftModel

    from pipeline.core.checkpoints import load_model, load_tokenizer
    from pipeline.core.config import EvalConfig, ModelConfig
    from pipeline.core.devices import resolve_device, resolve_dtype
    from pipeline.core.prompts import chat_text, render_prompt, use_recorded_prompt_format
    from pipeline.stages.eval import _stop_ids

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise PipelineError(f"{run_dir}: no config.yaml; give a run directory (outputs/runs/<time>) or a sweep's job "
                            f"directory (outputs/sweeps/<time>/<n>)")
    cfg = OmegaConf.load(config_file)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    ev = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg.eval))
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    completion = lambda q: ev.completion_prompt.format(question=q)  # noqa: E731  as eval asks base and CPT models

    def load(path):
        return load_model(path, dtype, dev, model_cfg.trust_remote_code).eval(), load_tokenizer(
            path, model_cfg.trust_remote_code)

    speakers: List[Speaker] = []
    if "base" in models:
        model, tok = load(model_cfg.path)
        speakers.append(Speaker("base", model, tok, completion, _stop_ids(tok, model), loaded_from=[model_cfg.path]))
    cpt, export = _link(run_dir, "cpt_model"), _link(run_dir, "export")
    final = _link(run_dir, "cv_model") or cpt
    adapter = _link(run_dir, "sft_adapter")
    if "sft" in models and export and (export / "model").is_dir():
        model, tok = load(export / "model")
        speakers.append(Speaker("export", model, tok, lambda q, t=tok: chat_text([{"role": "user", "content": q}], t),
                                _stop_ids(tok, model), loaded_from=[str(export / "model")]))
    elif "sft" in models and adapter and final:
        model, tok = load(final)
        template = use_recorded_prompt_format(tok, adapter, model_cfg)
        model = PeftModel.from_pretrained(model, str(adapter)).to(dev).eval()
        sft = Speaker("sft", model, tok, lambda q, t=tok: render_prompt([{"role": "user", "content": q}], t, template),
                      _stop_ids(tok, model), loaded_from=[str(final), str(adapter)])
        if "cpt" in models and final == cpt:  # the same weights with the adapter off: not loaded a second time
            speakers.append(Speaker("cpt", model, tok, completion, sft.stop_ids, adapter_off=True))
        speakers.append(sft)
    if "cpt" in models and cpt and not any(s.name == "cpt" for s in speakers):
        model, tok = load(cpt)
        speakers.insert(len([s for s in speakers if s.name == "base"]),
                        Speaker("cpt", model, tok, completion, _stop_ids(tok, model), loaded_from=[str(cpt)]))
    if not speakers:
        raise PipelineError(f"{run_dir}: none of the models {list(models)} is in this run")
    return speakers, ev


def answer(s: Speaker, question: str, max_new_tokens: int, stop: Optional[str], out: Optional[TextIO] = None) -> str:
    """One greedy answer, cut by eval's rule; streamed to `out` as it is generated (only the part kept)."""
    import torch
    from transformers import StoppingCriteriaList, TextStreamer

    from pipeline.stages.eval import _stop_at_cut, cut_answer

    class Shown(TextStreamer):
        """Prints the growing answer as eval will cut it: nothing before its first character, nothing after the cut."""

        def __init__(self):
            super().__init__(s.tok, skip_prompt=True, skip_special_tokens=True)
            self.raw, self.printed = "", ""

        def on_finalized_text(self, text, stream_end=False):
            self.raw += text
            shown = cut_answer(self.raw, stop) if stream_end else self.raw.lstrip().split(stop or "\0", 1)[0]
            shown = shown.rstrip("\ufffd")
            if out is not None and shown.startswith(self.printed) and len(shown) > len(self.printed):
                out.write(shown[len(self.printed):])
                out.flush()
                self.printed = shown

    prompt = s.prompt(question).rstrip(" ")  # eval moves a trailing space into the answer (encode_pair)
    enc = s.tok(prompt, return_tensors="pt").to(s.model.device)
    criteria = StoppingCriteriaList([_stop_at_cut(s.tok, enc["input_ids"].shape[1], stop)] if stop else [])
    switch = s.model.disable_adapter() if s.adapter_off else contextlib.nullcontext()
    with switch, torch.no_grad():
        seq = s.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=s.stop_ids,
                               pad_token_id=s.tok.pad_token_id, stopping_criteria=criteria, streamer=Shown())
    row = seq[0, enc["input_ids"].shape[1]:].tolist()
    end = next((i for i, t in enumerate(row) if t in s.stop_ids), len(row))
    return cut_answer(s.tok.decode(row[:end], skip_special_tokens=True), stop)


def read_questions(path: Path) -> List[str]:
    if not path.is_file():
        raise PipelineError(f"--question-file {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [x.strip() for x in lines if x.strip()]
    questions = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)["question"]
        except (ValueError, KeyError, TypeError):
            raise PipelineError(f"{path}:{n}: not a JSON object with a 'question'") from None
        questions.append(str(q))
    return questions


def table(speakers: List[Speaker], questions: List[str], max_new_tokens: int, stop: Optional[str]) -> str:
    import pandas as pd

    rows = [{"question": q, **{s.name: answer(s, q, max_new_tokens, stop) for s in speakers}} for q in questions]
    return pd.DataFrame(rows).to_markdown(index=False)


def chat(speakers: List[Speaker], max_new_tokens: int, stop: Optional[str], inp: TextIO, out: TextIO) -> None:
    width = max(len(s.name) for s in speakers)
    interactive = inp.isatty()
    while True:
        if interactive:
            out.write("\nquestion> ")
            out.flush()
        line = inp.readline()
        if not line:  # end of input
            break
        question = line.strip()
        if not question:
            continue
        if not interactive:
            out.write(f"question> {question}\n")
        for s in speakers:
            out.write(f"{s.name:>{width}}: ")
            out.flush()
            answer(s, question, max_new_tokens, stop, out)
            out.write("\n")
            out.flush()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.chat", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory or a sweep's job directory")
    parser.add_argument("--question-file", type=Path, help=".jsonl with a question field, or one question a line")
    parser.add_argument("--models", default="base,cpt,sft", help="which models answer (default base,cpt,sft)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    args = parser.parse_args(argv)
    try:
        import warnings

        import transformers

        transformers.utils.logging.set_verbosity_error()  # the answers are the output: no load notices between them
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
        questions = read_questions(args.question_file) if args.question_file else None
        speakers, ev = load_speakers(args.run_dir, args.device, tuple(args.models.split(",")))
        tokens, stop = args.max_new_tokens or ev.max_new_tokens, ev.completion_stop or None
        if questions is not None:
            print(table(speakers, questions, tokens, stop))
        else:
            print(f"{', '.join(s.name for s in speakers)} answer each question (greedy, the first line); "
                  f"end with Ctrl-D or Ctrl-C", file=sys.stderr)
            chat(speakers, tokens, stop, sys.stdin, sys.stdout)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
