"""Stage augment (optional, before cpt): a local instruct model rewrites the CPT documents into more training text.

    python -m pipeline.run 'stages=[augment,cpt,merge,sft,eval]'
    python -m pipeline.run 'stages=[augment]' augment.generator_path=/models/llm-jp-3-3.7b-instruct

Knowledge stated once in running text is memorised but hard to extract as answers (Physics of LMs 3.1); the same
facts restated in other forms (questions and answers, other wordings, how two things relate) are what makes them
answerable after CPT (EntiGraph, SPA, Active Reading; docs/augmentation.md). Each document is cut into passages of
at most augment.passage_tokens generator tokens at sentence ends; every passage is sent to the generator once per
sample of every strategy (augment.strategies: name -> samples per passage), as the strategy's prompt template
conf/augment/prompts/<language>/<name>.txt with the passage in place of {passage}. The `qa` strategy's replies are
parsed into question-answer pairs; the others are kept as text.

Filters, in this order (the first that fails names the reason; counts per strategy in augment_stats.json):
- unparsed: a `qa` reply without a "質問:/答え:" (or "Question:/Answer:") pair;
- repetitive: a text that loops (a line three times, or a 2-10 character piece three times in a row, eval's rule);
- test_question: a generated question equal to a scored question of data.qa.path after the scorer's normalisation
  (pipeline/core/scoring.py): training on it would measure the model on its own training data;
- ungrounded: a QA answer that its passage does not contain (scoring.contains: numbers compared whole); the
  passage, not the whole document: an answer found elsewhere in the document may answer another question;
- off_topic: a QA question about something its passage does not name (a number, an identifier or the Japanese
  topic the passage lacks: `CNC-14の点検周期` from a passage on `CNC-3`; pipeline/core/grounding.py, the rule
  pipeline.draft_qa uses): a grounded answer under another entity's question teaches a wrong fact;
- unfaithful: a number in the generated text that its source document never states, compared after the scorer's
  normalisation (`880t` = `八百八十トン` = `880トン`; `15` is not `5`), when augment.faithfulness is on;
- duplicate: a text whose normalised form is at least augment.dedup_similarity (rapidfuzz ratio, 0-100) similar to
  its passage or to a text kept before it.

The output directory holds augmented.jsonl (one kept text per line: `text`, or `question` + `answer`, with its
strategy and source document index), rejected.jsonl (the dropped ones with their reason) and augment_stats.json.
CPT reads it as extra documents (pipeline/stages/cpt.py). Generation is resumable: replies are appended batch by
batch to the stage's build directory, and a killed run continues after the last finished batch.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pipeline.core.config import AugmentConfig, DataConfig, ModelConfig, cache_settings
from pipeline.core.outputs import PipelineError, example, resumable_output, write_json
from pipeline.core.grounding import numbers, question_in_quote
from pipeline.core.scoring import contains, normalize

log = logging.getLogger(__name__)

AUGMENTED_FILE = "augmented.jsonl"
REPLIES_FILE = "replies.jsonl"  # in the build directory's kept folder: every finished batch's replies
REASONS = ("unparsed", "repetitive", "test_question", "ungrounded", "off_topic", "unfaithful", "duplicate")


# --- prompts and passages ------------------------------------------------------------------------------------------

def generator_path(cfg: AugmentConfig, model_cfg: ModelConfig) -> str:
    path = cfg.generator_path or model_cfg.instruct_path
    if not path:
        raise PipelineError("augment.generator_path: not set, and model.instruct_path (its default) is null; point "
                            "it at a local instruct model")
    return path


def template_file(cfg: AugmentConfig, name: str) -> Path:
    return Path(cfg.prompts_dir) / cfg.language / f"{name}.txt"


def load_templates(cfg: AugmentConfig) -> Dict[str, str]:
    """The prompt template of every strategy switched on (count > 0), checked: it exists and has one {passage}."""
    active = {name: n for name, n in cfg.strategies.items() if n}
    if not active:
        raise PipelineError(f"augment.strategies={dict(cfg.strategies)}: every count is 0; switch on at least one")
    templates = {}
    for name, n in active.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise PipelineError(f"augment.strategies.{name}={n!r}: a count of samples per passage (an integer >= 0)")
        f = template_file(cfg, name)
        if not f.is_file():
            raise PipelineError(f"augment.strategies.{name}: no prompt template {f} (augment.prompts_dir/"
                                f"augment.language/<strategy>.txt)")
        text = f.read_text(encoding="utf-8").strip()
        try:
            text.format(passage="")
        except (KeyError, IndexError, ValueError) as e:
            raise PipelineError(f"{f}: use the field {{passage}} only, and {{{{ }}}} for literal braces "
                                f"({type(e).__name__}: {e})") from None
        if "{passage}" not in text:
            raise PipelineError(f"{f}: the template has no {{passage}} field")
        templates[name] = text
    return templates


_SENTENCE_END = re.compile(r"[。！？!?]+[」』）)]*|\.(?=\s)|\n+")


def split_passages(doc: str, count_tokens, max_tokens: int) -> List[str]:
    """`doc` cut at sentence ends into passages of at most `max_tokens` tokens (a longer sentence stays whole, so
    max_tokens=1 gives one sentence per passage); `count_tokens(text) -> int`."""
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(doc):
        sentences.append(doc[start:m.end()])
        start = m.end()
    sentences.append(doc[start:])
    passages, current = [], ""
    for s in sentences:
        if not s.strip():
            current += s
            continue
        if current.strip() and count_tokens(current + s) > max_tokens:
            passages.append(current.strip())
            current = ""
        current += s
    if current.strip():
        passages.append(current.strip())
    return passages


# --- filters -------------------------------------------------------------------------------------------------------

_QA = re.compile(r"(?:質問|問題|問い|question|q)\s*[:：]\s*(?P<q>[^\n]+?)\s*\n+\s*(?:答え|回答|答|answer|a)\s*[:：]\s*"
                 r"(?P<a>[^\n]+)", re.IGNORECASE)


def parse_qa(reply: str) -> List[Tuple[str, str]]:
    """The question-answer pairs of a `qa` reply: a question line followed by an answer line."""
    return [(m["q"].strip(), m["a"].strip()) for m in _QA.finditer(reply) if m["q"].strip() and m["a"].strip()]


def unfaithful_numbers(text: str, source_numbers: set) -> set:
    """The numbers of `text` its source does not state (empty: faithful)."""
    return numbers(text) - source_numbers


def is_looping(text: str) -> bool:
    """A degenerate reply: the same non-blank line three times, or eval's repetition (a 2-10 character piece three
    times in a row)."""
    from collections import Counter

    from pipeline.stages.eval import is_repetitive

    lines = Counter(line.strip() for line in text.splitlines() if line.strip())
    return is_repetitive(text) or any(n >= 3 for n in lines.values())


def is_grounded(answer: str, source: str) -> bool:
    """The answer, normalised, is a contiguous run of the source's normalised text (numbers matched whole)."""
    return bool(contains(source, answer))


class NearDuplicates:
    """Texts seen so far, normalised; `seen(text)` says whether `text` is at least `similarity` (rapidfuzz ratio,
    0-100) similar to one of them, and remembers it when it is not."""

    def __init__(self, similarity: Optional[float]):
        self.similarity, self.pool = similarity, []

    def add(self, text: str) -> None:
        self.pool.append(normalize(text))

    def seen(self, text: str) -> bool:
        from rapidfuzz import fuzz, process

        norm = normalize(text)
        if self.similarity is not None and self.pool and process.extractOne(
                norm, self.pool, scorer=fuzz.ratio, score_cutoff=self.similarity) is not None:
            return True
        self.pool.append(norm)
        return False


def filter_replies(jobs: List[dict], replies: List[str], docs: List[str], passages: List[List[str]],
                   cfg: AugmentConfig, scored_questions: set) -> Tuple[List[dict], List[dict], Dict[str, dict]]:
    """Apply the filters (module docstring) to every reply, in the fixed order of the jobs.

    Returns (kept items, rejected items with their reason, per-strategy counts)."""
    counts = {name: {"prompts": 0, "generated": 0, "kept": 0, **{r: 0 for r in REASONS}}
              for name in dict.fromkeys(j["strategy"] for j in jobs)}
    doc_numbers = [numbers(d) for d in docs]
    dedup = NearDuplicates(cfg.dedup_similarity)
    for ps in passages:
        for p in ps:
            dedup.add(p)  # a "rewrite" that copies its passage is no new text
    kept, rejected = [], []
    for job, reply in zip(jobs, replies):
        name, d = job["strategy"], job["doc"]
        c = counts[name]
        c["prompts"] += 1
        if name.startswith("qa"):
            pairs = parse_qa(reply)
            items = [{"question": q, "answer": a} for q, a in pairs]
            if not items:
                c["unparsed"] += 1
                rejected.append({"strategy": name, "doc": d, "reason": "unparsed", "text": reply})
                continue
        else:
            items = [{"text": reply}] if reply.strip() else []
        for item in items:
            c["generated"] += 1
            text = item.get("text") or f"{item['question']}\n{item['answer']}"
            reason = None
            if is_looping(text):
                reason = "repetitive"
            elif "question" in item and normalize(item["question"]) in scored_questions:
                reason = "test_question"
            elif "answer" in item and not is_grounded(item["answer"], passages[d][job["passage"]]):
                reason = "ungrounded"
            elif "question" in item and not question_in_quote(item["question"], passages[d][job["passage"]]):
                reason = "off_topic"
            elif cfg.faithfulness and unfaithful_numbers(text, doc_numbers[d]):
                reason = "unfaithful"
            elif dedup.seen(text):
                reason = "duplicate"
            row = {"strategy": name, "doc": d, "passage": job["passage"], **item}
            if reason:
                c[reason] += 1
                rejected.append({**row, "reason": reason})
            else:
                c["kept"] += 1
                kept.append(row)
    return kept, rejected, counts


def scored_question_set(qa_part) -> set:
    """The scored questions (data.qa, read with its field keys), normalised: generated questions must not be one."""
    from pipeline.core.data import load_qa, qa_fields

    return {normalize(q.question) for q in load_qa(qa_part.path, **qa_fields(qa_part))} if qa_part.path else set()


# --- the stage -----------------------------------------------------------------------------------------------------

def key_material(cfg: AugmentConfig, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, dtype: str) -> dict:
    """What the augmented text depends on: the generator (by its files), its dtype, the settings and seed, every
    strategy's prompt template (by content), the corpus, and the scored questions the test-question filter drops."""
    from pipeline.cache import fingerprint_model
    from pipeline.core.data import fingerprint_documents, fingerprint_qa, qa_fields

    templates = {name: template_file(cfg, name).read_text(encoding="utf-8") if template_file(cfg, name).is_file()
                 else None for name, n in cfg.strategies.items() if n}
    settings = cache_settings(cfg)
    settings.pop("generator_path")  # the model is identified by its files, not where it lies
    settings.pop("prompts_dir")  # the templates by their contents
    return {"augment": settings, "seed": seed, "generator": fingerprint_model(generator_path(cfg, model_cfg)),
            "generator_dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code, "templates": templates,
            # the records as read, whatever their format or field names (pipeline/core/data.py)
            "data": fingerprint_documents(data_cfg.cpt.path, data_cfg.cpt.text_field, "data.cpt.path"),
            "scored_qa": fingerprint_qa(data_cfg.qa.path, "data.qa.path", **qa_fields(data_cfg.qa))
            if data_cfg.qa.path else None}


def _read_replies(path: Path) -> Dict[int, List[str]]:
    """Finished batches from an earlier, killed build: {batch index: replies}. A line cut short by the kill is the
    batch that was being written: it is generated again."""
    done: Dict[int, List[str]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[int(row["batch"])] = list(row["replies"])
            except (ValueError, KeyError, TypeError):
                break
    return done


def augment_corpus(cfg: AugmentConfig, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int,
                   out_dir: str | Path, device: str = "auto") -> Path:
    """Generate, filter and write the augmented text for the CPT corpus of `data_cfg`; returns `out_dir`."""
    from tqdm.auto import tqdm

    from pipeline.core.data import load_cpt_documents
    from pipeline.core.generate import Generator, release
    from pipeline.core.outputs import TRAINER_DIR

    out_dir = Path(out_dir)
    templates = load_templates(cfg)
    docs = load_cpt_documents(data_cfg.cpt.path, data_cfg.cpt.text_field, key="data.cpt.path")
    scored = scored_question_set(data_cfg.qa)
    path = generator_path(cfg, model_cfg)
    gen = Generator(path, engine=cfg.engine, device=device, dtype=model_cfg.dtype, batch_size=cfg.batch_size,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                    trust_remote_code=model_cfg.trust_remote_code)
    count = lambda text: gen.count_tokens([text])  # noqa: E731
    passages = [split_passages(d, count, cfg.passage_tokens) for d in docs]
    if cfg.max_passages:  # a quick look: the first N passages of the corpus, in document order
        left = cfg.max_passages
        for i, ps in enumerate(passages):
            passages[i], left = ps[:left], max(0, left - len(ps))
    # The work in a fixed order: document, passage, strategy, sample. Batches are cut from this list, so a resumed
    # run regenerates exactly the batches that were not finished, with the same seeds.
    jobs = [{"doc": d, "passage": j, "strategy": name, "sample": k, "prompt": tmpl.format(passage=p)}
            for d, ps in enumerate(passages) for j, p in enumerate(ps)
            for name, tmpl in templates.items() for k in range(cfg.strategies[name])]
    batches = [jobs[i:i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]
    last_batch_of_doc = {}
    for b, batch in enumerate(batches):
        for job in batch:
            last_batch_of_doc[job["doc"]] = b
    source_tokens = gen.count_tokens([p for ps in passages for p in ps])  # the text actually sent
    log.info("augment: %d documents (%d generator tokens) -> %d passages x strategies %s = %d prompts in %d "
             "batches; generator %s (%s)", len(docs), source_tokens, sum(map(len, passages)),
             {k: v for k, v in cfg.strategies.items() if v}, len(jobs), len(batches), path, cfg.engine)

    with resumable_output(out_dir) as build:
        # resumable_output keeps only the folder named TRAINER_DIR across a kill: the replies live there.
        (build / TRAINER_DIR).mkdir(exist_ok=True)
        replies_path = build / TRAINER_DIR / REPLIES_FILE
        done = _read_replies(replies_path)
        resumed = len(done)
        # Only the complete lines go on: a line the kill cut short would hide every batch appended after it.
        replies_path.write_text("".join(json.dumps({"batch": b, "replies": r}, ensure_ascii=False) + "\n"
                                        for b, r in sorted(done.items())), encoding="utf-8")
        if done:
            log.info("augment: resuming an interrupted build: %d of %d batches already generated", len(done),
                     len(batches))
        last_batches, first_missing = sorted(last_batch_of_doc.values()), [0]

        def finished_docs() -> int:  # documents whose batches are all done (batches finish in order)
            while first_missing[0] < len(batches) and first_missing[0] in done:
                first_missing[0] += 1
            return bisect.bisect_left(last_batches, first_missing[0])

        bar = tqdm(total=len(last_batches), initial=finished_docs(), desc="augment", unit="doc", dynamic_ncols=True,
                   mininterval=0.5 if os.isatty(2) else 30.0)
        t0, tokens0 = time.time(), 0
        with replies_path.open("a", encoding="utf-8") as sink:
            for b, batch in enumerate(batches):
                if b in done:
                    continue
                done[b] = gen.generate([j["prompt"] for j in batch], first_index=b * cfg.batch_size)
                sink.write(json.dumps({"batch": b, "replies": done[b]}, ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())  # a finished batch survives a kill
                bar.update(finished_docs() - bar.n)
                seconds = time.time() - t0
                bar.set_postfix_str(f"{(gen.generated_tokens - tokens0) / max(seconds, 1e-9):,.0f} generated "
                                    f"tokens/s", refresh=False)
        bar.close()
        seconds = time.time() - t0
        new_tokens = gen.generated_tokens
        replies = [r for b in range(len(batches)) for r in done[b]]
        release(gen)

        kept, rejected, counts = filter_replies(jobs, replies, docs, passages, cfg, scored)
        for name, c in counts.items():
            mine = [r for j, r in zip(jobs, replies) if j["strategy"] == name]
            kept_text = [k.get("text") or f"{k['question']}\n{k['answer']}" for k in kept if k["strategy"] == name]
            c["generated_tokens"] = gen.count_tokens(mine) if mine else 0
            c["kept_tokens"] = gen.count_tokens(kept_text) if kept_text else 0
            c["generated_per_source_token"] = round(c["generated_tokens"] / max(source_tokens, 1), 4)
            c["kept_per_source_token"] = round(c["kept_tokens"] / max(source_tokens, 1), 4)
            log.info("augment %s: %d prompts -> %d generated, %d kept; dropped %s", name, c["prompts"],
                     c["generated"], c["kept"], {r: c[r] for r in REASONS if c[r]} or "none")
        for row in kept[:3]:
            log.info("augment example (%s): %s", row["strategy"], example(row.get("text") or
                                                                          f"{row['question']} -> {row['answer']}"))
        with (build / AUGMENTED_FILE).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        with (build / "rejected.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
        n_docs = len(last_batches)  # documents with at least one passage (all of them unless max_passages cut)
        write_json(build / "augment_stats.json", {
            "generator": str(path), "engine": cfg.engine, "documents": n_docs, "passages": sum(map(len, passages)),
            "prompts": len(jobs), "batches": len(batches), "resumed_batches": resumed,
            "source_tokens": source_tokens, "kept": len(kept), "rejected": len(rejected),
            "kept_tokens": sum(c["kept_tokens"] for c in counts.values()),
            "generated_tokens": sum(c["generated_tokens"] for c in counts.values()),
            "seconds": round(seconds, 2), "generated_tokens_this_run": new_tokens,
            "documents_per_second": round(n_docs / seconds, 4) if seconds > 0 and new_tokens else None,
            "generated_tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 and new_tokens else None,
            "seconds_per_document": round(seconds / n_docs, 3) if n_docs and new_tokens else None,
            "strategies": counts})
        log.info("augment: %d texts kept of %d generated (%.0fs, %d generated tokens)", len(kept),
                 len(kept) + len(rejected), seconds, new_tokens)
    return out_dir


def load_augmented(path: str | Path, qa_template: str) -> List[str]:
    """The kept texts of an augment output as CPT documents; QA pairs written with `qa_template` (cpt.qa_template,
    the format base and CPT models are asked in)."""
    from pipeline.core.data import iter_jsonl

    out = []
    for _, row in iter_jsonl(Path(path) / AUGMENTED_FILE):
        if "question" in row:
            out.append(qa_template.format(question=row["question"], answer=row["answer"]))
        elif row.get("text", "").strip():
            out.append(row["text"].strip())
    return out
