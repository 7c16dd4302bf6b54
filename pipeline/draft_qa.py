"""Draft QA candidates from the CPT documents with a local instruct model, filter them, and review them by hand.

    python -m pipeline.draft_qa                                    # the demo: its corpus, its generator
    python -m pipeline.draft_qa model=llm_jp_3 model.path=/models/llm-jp-3-3.7b data.cpt.path=/data/manuals \
      data.qa.path=/data/qa.jsonl draft_qa.generator_path=/models/llm-jp-3-3.7b-instruct
    python -m pipeline.draft_qa accept outputs/draft_qa/<time>/review.csv --into /data/qa.jsonl

Every number the pipeline prints is measured on the QA set, and a wrong gold answer silently turns a right model
answer into an error, so a candidate is kept only when it can be checked against its document:

1. The corpus is cut along its structure: a Markdown/text file into paragraphs under their heading, a paragraph
   longer than draft_qa.chunk_tokens at sentence ends; a .jsonl file into its records. Each chunk knows its
   `file:line`.
2. Each chunk goes to the generator (pipeline/core/generate.py, the augment stage's) with the prompt template
   conf/draft_qa/prompts/<language>/<prompt>.txt: the chunk, its heading, and a few questions of data.qa as the
   style to ask in. With engine=vllm the reply is constrained to the candidate's JSON schema; otherwise a tolerant
   parser reads a JSON object anywhere in the reply, or `Q:`/`A:`/`Quote:` (質問/答え/引用) lines.
3. Filters, in this order, each counted in draft_stats.json (the first that fails names the reason):
   - unparsed: no question and answer could be read from the reply;
   - quote_not_in_source: the quote is not in the chunk's document (rapidfuzz partial_ratio of the scorer's
     normalised texts below draft_qa.quote_similarity). A reply without a quote is given the sentence of its chunk
     that contains the answer (counted as quote_from_chunk);
   - answer_not_in_quote: the answer is not in the quote (scoring.contains: the scorer's normalisation, numbers
     whole), so it is not what the document says;
   - question_not_in_quote: the question asks about something its quote does not name: a number or identifier of
     the question (a machine's `P-24`, `CNC-3` for `炉-3`, a year) the quote does not state, a Japanese question's
     topic (its first name or term) the quote does not hold, or no name or term shared with the quote at all (a run
     of two or more characters without hiragana, four for Latin letters): the true answer is about something else;
   - in_qa: the question is already in data.qa (same_question: rapidfuzz ratio of the normalised questions >=
     draft_qa.duplicate_similarity, and no difference but hiragana), or its fact is: an item of data.qa has the
     same answer (or alias) and its question names the candidate's subject (another wording of a known question);
   - training_overlap: the question is asked in training data (data.cpt_qa, data.dev_qa, the augment stage's
     generated QA at draft_qa.augmented): a scored question the model trained on measures nothing;
   - duplicate: the same question (same_question), or the same fact (the same answer about the same subject), was
     kept before: one fact asked twice;
   - closed_book (draft_qa.closed_book=true): the base model (model.path) already answers it; such a question
     measures no injected knowledge, and goes to general_qa_candidates.jsonl instead.
4. The output directory holds candidates.jsonl (`id, question, answer, aliases, quote, source, group`),
   rejected.jsonl (with the reason), draft_stats.json, review.html (each candidate with its quote highlighted in
   the document's context, a self-contained page) and review.csv (accept / edit / reject columns). The `accept`
   command turns the reviewed CSV into data.qa JSONL.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pipeline  # noqa: F401  (sets the offline environment before any Hugging Face import)

from pipeline.core.data import QAItem
from pipeline.core.grounding import question_in_quote, subject
from pipeline.core.outputs import PipelineError, write_json
from pipeline.core.scoring import contains, normalize

log = logging.getLogger("pipeline.draft_qa")

REASONS = ("unparsed", "quote_not_in_source", "answer_not_in_quote", "question_not_in_quote", "in_qa",
           "training_overlap", "duplicate", "closed_book")
# engine=vllm constrains every reply to this schema; the parser below reads the same keys from any engine's reply.
SCHEMA = {"type": "object", "required": ["question", "answer", "quote"],
          "properties": {"question": {"type": "string"}, "answer": {"type": "string"},
                         "aliases": {"type": "array", "items": {"type": "string"}}, "quote": {"type": "string"}}}
REVIEW_COLUMNS = ("id", "accept", "edit", "reject", "question", "answer", "aliases", "group", "source", "quote")


# --- chunks --------------------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    file: Path
    line: int  # 1-based line of the chunk's first character in its file
    heading: str
    text: str
    document: str  # what the quote must be found in: the whole file, or the .jsonl record


_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def _paragraphs(text: str) -> Iterable[Tuple[int, str, str]]:
    """(first line, heading, paragraph) of a Markdown/text document: blank lines separate paragraphs, a `#` line
    starts a section and is the heading of the paragraphs under it."""
    heading, start, lines = "", None, []
    for i, line in enumerate(text.splitlines() + [""], start=1):
        m = _HEADING.match(line)
        if m or not line.strip():
            if lines:
                yield start, heading, "\n".join(lines)
            lines, start = [], None
            if m:
                heading = m.group(1)
            continue
        if start is None:
            start = i
        lines.append(line)


def _split(paragraph: str, count_tokens, max_tokens: int) -> List[Tuple[int, str]]:
    """(line offset, piece) of a paragraph cut at sentence ends into pieces of at most max_tokens tokens."""
    from pipeline.stages.augment import split_passages

    out, pos = [], 0
    for piece in split_passages(paragraph, count_tokens, max_tokens):
        at = paragraph.find(piece, pos)
        at = pos if at < 0 else at
        out.append((paragraph.count("\n", 0, at), piece))
        pos = at + len(piece)
    return out


def chunk_corpus(spec: str, text_field: str, count_tokens, max_tokens: int,
                 key: str = "data.cpt.path") -> List[Chunk]:
    """The corpus of data.cpt.path in chunks that follow its structure (module docstring, step 1)."""
    from pipeline.core.data import CPT_SUFFIXES, _read_text, iter_jsonl, resolve_files

    chunks: List[Chunk] = []
    for f in resolve_files(spec, key, CPT_SUFFIXES):
        if f.suffix == ".jsonl":
            for lineno, obj in iter_jsonl(f):
                text = obj.get(text_field)
                if not isinstance(text, str):
                    raise PipelineError(f"{f}:{lineno}: missing string field '{text_field}' (data.cpt.text_field)")
                for _, piece in _split(text.strip(), count_tokens, max_tokens):
                    chunks.append(Chunk(f, lineno, "", piece, text))
        else:
            text = _read_text(f)
            for start, heading, para in _paragraphs(text):
                for offset, piece in _split(para, count_tokens, max_tokens):
                    chunks.append(Chunk(f, start + offset, heading, piece, text))
    if not chunks:
        raise PipelineError(f"{key}={spec}: the corpus is empty (all documents are blank)")
    return chunks


# --- prompts and replies -------------------------------------------------------------------------------------------

def load_template(prompts_dir: str, language: str, name: str) -> str:
    f = Path(prompts_dir) / language / f"{name}.txt"
    if not f.is_file():
        raise PipelineError(f"draft_qa.prompt={name}: no prompt template {f} (draft_qa.prompts_dir/"
                            f"draft_qa.language/<prompt>.txt)")
    text = f.read_text(encoding="utf-8").strip()
    try:
        text.format(passage="", heading="", examples="")
    except (KeyError, IndexError, ValueError) as e:
        raise PipelineError(f"{f}: use the fields {{passage}}, {{heading}}, {{examples}} only, and {{{{ }}}} for "
                            f"literal braces ({type(e).__name__}: {e})") from None
    if "{passage}" not in text:
        raise PipelineError(f"{f}: the template has no {{passage}} field")
    return text


_FIELDS = {"question": ("question", "q", "質問", "問題", "問い"), "answer": ("answer", "a", "答え", "回答", "答"),
           "quote": ("quote", "evidence", "citation", "引用", "根拠", "出典")}
_LINE = re.compile(r"^\s*(?:[-*]\s*)?\**(?P<key>[^\s:：*]{1,10})\**\s*[:：]\s*(?P<value>.*?)\s*$")


def _as_candidate(obj: dict) -> Optional[dict]:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    out = {}
    for name, keys in _FIELDS.items():
        value = next((lowered[k] for k in keys if isinstance(lowered.get(k), str)), "")
        out[name] = value.strip()
    aliases = lowered.get("aliases") or lowered.get("別表記") or []
    out["aliases"] = [a.strip() for a in aliases if isinstance(a, str) and a.strip()] if isinstance(aliases, list) \
        else []
    return out if out["question"] and out["answer"] else None


def parse_reply(reply: str) -> Optional[dict]:
    """{question, answer, aliases, quote} read from a generator's reply, or None.

    Tolerant, because small local models wrap their JSON in prose or code fences, or ignore the format: the first
    JSON object anywhere in the reply that has a question and an answer; else `Q:`/`A:`/`Quote:` lines (also
    Question/Answer, 質問/答え/回答, 引用/根拠), a value running on until the next labelled line."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", reply):
        try:
            obj, _ = decoder.raw_decode(reply, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and (cand := _as_candidate(obj)):
            return cand
    found: Dict[str, List[str]] = {}
    current = None
    for line in reply.splitlines():
        m = _LINE.match(line)
        name = next((n for n, keys in _FIELDS.items() if m and m["key"].lower() in keys), None)
        if name and name not in found:
            found[name], current = [m["value"]], name
        elif name:  # a second question: the first candidate is complete
            break
        elif current and line.strip():
            found[current].append(line.strip())
    cand = {k: " ".join(v).strip().strip("\"「」") for k, v in found.items()}
    return _as_candidate(cand) if cand else None


# --- filters -------------------------------------------------------------------------------------------------------

_SENTENCE = re.compile(r"[^。！？!?\n]+?(?:[。！？!?]+[」』）)]*|\.(?=\s|$)|$)", re.MULTILINE)


def quote_from_chunk(chunk_text: str, answer: str) -> str:
    """The first sentence of the chunk that contains the answer (the chunk itself when none does)."""
    for s in _SENTENCE.findall(chunk_text):
        if s.strip() and contains(s, answer):
            return s.strip()
    return chunk_text


def quote_score(quote: str, document: str) -> float:
    """How well the quote is found in the document, 0-100: rapidfuzz partial_ratio (the best-matching window of the
    document) of the two texts after the scorer's normalisation, so width, punctuation and numerals do not count."""
    from rapidfuzz import fuzz

    q = normalize(quote)
    return fuzz.partial_ratio(q, normalize(document)) if q else 0.0


def _hiragana(ch: str) -> bool:
    return "\u3041" <= ch <= "\u309f"


def same_question(a: str, b: str, similarity: float) -> bool:
    """Two normalised questions ask the same thing: at least `similarity` alike (rapidfuzz ratio, 0-100), and every
    character that differs is hiragana (a particle or an ending: `何トンですか` / `何トンでしょうか`), so `P-101の…` and
    `P-102の…`, or two people's names in one template, stay two questions however alike the rest is."""
    from rapidfuzz import fuzz
    from rapidfuzz.distance import Levenshtein

    if fuzz.ratio(a, b) < similarity:
        return False
    for op in Levenshtein.editops(a, b):
        changed = ([a[op.src_pos]] if op.tag != "insert" else []) + ([b[op.dest_pos]] if op.tag != "delete" else [])
        if not all(_hiragana(ch) for ch in changed):
            return False
    return True


class QuestionPool:
    """Questions known so far, normalised; `match(q)` says whether one of them is the same question (same_question)."""

    def __init__(self, questions: Iterable[str], similarity: float):
        self.similarity = similarity
        self.pool = [normalize(q) for q in questions]

    def match(self, question: str) -> bool:
        from rapidfuzz import fuzz, process

        norm = normalize(question)
        # the candidates at least `similarity` alike, best first; then the strict check on each
        near = process.extract(norm, self.pool, scorer=fuzz.ratio, score_cutoff=self.similarity, limit=None)
        return any(same_question(norm, other, self.similarity) for other, _, _ in near)

    def add(self, question: str) -> None:
        self.pool.append(normalize(question))


def training_questions(data_cfg, augmented: Optional[str]) -> List[str]:
    """The questions the pipeline trains on: data.cpt_qa, data.dev_qa, and an augment output's generated QA."""
    from pipeline.core.data import iter_jsonl, load_qa

    out = []
    for name in ("cpt_qa", "dev_qa"):
        path = getattr(data_cfg, name).path
        if path:
            out += [q.question for q in load_qa(path, key=f"data.{name}.path")]
    if augmented:
        f = Path(augmented) / "augmented.jsonl"
        if not f.is_file():
            raise PipelineError(f"draft_qa.augmented={augmented}: no augmented.jsonl there (an augment stage output, "
                                f"e.g. outputs/runs/<run>/augmented)")
        out += [row["question"] for _, row in iter_jsonl(f) if isinstance(row.get("question"), str)]
    return out


def filter_candidates(items: List[dict], chunks: List[Chunk], scored: Sequence, training: Sequence[str],
                      quote_similarity: float, duplicate_similarity: float) -> Tuple[List[dict], List[dict], dict]:
    """Apply the filters (module docstring, step 3, all but closed_book) to parsed replies in order.

    `items`: {chunk: index, reply: text, parsed: dict or None}; `scored`: data.qa's QAItems (or plain questions).
    Returns (kept, rejected, counts)."""
    counts = {"replies": len(items), "kept": 0, "quote_from_chunk": 0, **{r: 0 for r in REASONS}}
    scored = [q if hasattr(q, "question") else QAItem("", q, "") for q in scored]
    in_qa, overlap = QuestionPool([q.question for q in scored], duplicate_similarity), \
        QuestionPool(training, duplicate_similarity)
    # the QA set's facts by answer: a candidate with one of these answers asks a known fact when its subject is
    # named in that item's question (another wording of a question already in the set)
    qa_by_answer: Dict[str, List[str]] = {}
    for q in scored:
        for a in [q.answer, *q.aliases]:
            if a:
                qa_by_answer.setdefault(normalize(a), []).append(normalize(q.question))
    kept_questions, kept_facts = QuestionPool([], duplicate_similarity), set()
    kept, rejected = [], []
    for item in items:
        chunk, cand = chunks[item["chunk"]], item["parsed"]
        source = f"{chunk.file}:{chunk.line}"
        if cand is None:
            counts["unparsed"] += 1
            rejected.append({"reason": "unparsed", "source": source, "reply": item["reply"]})
            continue
        cand = dict(cand)
        if not cand["quote"]:
            cand["quote"] = quote_from_chunk(chunk.text, cand["answer"])
            counts["quote_from_chunk"] += 1
        about = subject(cand["question"], cand["quote"])
        fact = (normalize(cand["answer"]), about)  # one fact: its answer and what it is about
        if quote_score(cand["quote"], chunk.document) < quote_similarity:
            reason = "quote_not_in_source"
        elif not contains(cand["quote"], cand["answer"]):
            reason = "answer_not_in_quote"
        elif not question_in_quote(cand["question"], cand["quote"]):
            reason = "question_not_in_quote"
        elif in_qa.match(cand["question"]) or any(about in q for q in qa_by_answer.get(fact[0], [])):
            reason = "in_qa"
        elif overlap.match(cand["question"]):
            reason = "training_overlap"
        elif fact in kept_facts or kept_questions.match(cand["question"]):
            reason = "duplicate"
        else:
            reason = None
        row = {**cand, "source": source, "heading": chunk.heading, "chunk": item["chunk"]}
        if reason:
            counts[reason] += 1
            rejected.append({**row, "reason": reason})
        else:
            counts["kept"] += 1
            kept_questions.add(cand["question"])
            kept_facts.add(fact)
            kept.append(row)
    return kept, rejected, counts


def closed_book_answers(model_path: str, questions: Sequence[str], prompt: str, model_cfg, device: str,
                        max_new_tokens: int = 32, batch_size: int = 16) -> List[str]:
    """The base model's greedy answers, asked as eval asks base models (a completion prompt, cut at the line end)."""
    from pipeline.core.checkpoints import load_model, load_tokenizer
    from pipeline.core.devices import resolve_device, resolve_dtype
    from pipeline.stages.eval import _stop_ids, generate

    dev = resolve_device(device)
    tok = load_tokenizer(model_path, model_cfg.trust_remote_code)
    model = load_model(model_path, resolve_dtype(model_cfg.dtype, dev), dev, model_cfg.trust_remote_code).eval()
    rows = generate(model, tok, [prompt.format(question=q) for q in questions], max_new_tokens, batch_size, dev,
                    _stop_ids(tok, model), stop_string="\n")
    return [text for text, _ in rows]


# --- the review ----------------------------------------------------------------------------------------------------

def _context(chunk: Chunk, quote: str, lines_around: int = 2) -> Dict[str, str]:
    """The chunk's document around the chunk (a few lines either side), split at the quote's best match so the page
    can highlight it: {before, quote, after}."""
    from rapidfuzz import fuzz

    doc_lines = chunk.document.splitlines()
    if chunk.file.suffix == ".jsonl":  # the record is the context
        text = chunk.document
    else:
        first = max(0, chunk.line - 1 - lines_around)
        last = chunk.line - 1 + chunk.text.count("\n") + lines_around + 1
        text = "\n".join(doc_lines[first:last])
    m = fuzz.partial_ratio_alignment(quote, text) if quote else None
    if not m or m.score < 50:
        return {"before": text, "quote": "", "after": ""}
    return {"before": text[:m.dest_start], "quote": text[m.dest_start:m.dest_end], "after": text[m.dest_end:]}


def write_review(out_dir: Path, kept: List[dict], chunks: List[Chunk], stats: dict) -> None:
    """review.html (self-contained: no script, no external file; pipeline/templates/draft_review.html.j2) and
    review.csv (one row per candidate; a person marks accept, edit or reject, and edits the cells of an `edit`)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)  # document text may hold < and &
    rows = [{**c, "context": _context(chunks[c["chunk"]], c["quote"])} for c in kept]
    html = env.get_template("draft_review.html.j2").render(name=out_dir.name, candidates=rows, stats=stats,
                                                           reasons=REASONS)
    (out_dir / "review.html").write_text(html, encoding="utf-8")
    with (out_dir / "review.csv").open("w", encoding="utf-8-sig", newline="") as f:  # BOM: Excel reads UTF-8
        w = csv.DictWriter(f, fieldnames=REVIEW_COLUMNS)
        w.writeheader()
        for c in kept:
            w.writerow({"id": c["id"], "accept": "", "edit": "", "reject": "", "question": c["question"],
                        "answer": c["answer"], "aliases": " | ".join(c["aliases"]), "group": c["group"] or "",
                        "source": c["source"], "quote": c["quote"]})


# --- the accept step -----------------------------------------------------------------------------------------------

def _marked(value: Optional[str]) -> bool:
    return bool(value and value.strip())


def read_review(path: Path) -> List[dict]:
    """The reviewed rows to add: those marked accept or edit, as data.qa records (their cells as edited)."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "accept", "edit", "reject", "question", "answer") if c not in
                   (reader.fieldnames or [])]
        if missing:
            raise PipelineError(f"{path}: missing column {missing[0]!r} (a review.csv of python -m pipeline.draft_qa)")
        out = []
        for lineno, row in enumerate(reader, start=2):
            marks = [c for c in ("accept", "edit", "reject") if _marked(row.get(c))]
            if len(marks) > 1:
                raise PipelineError(f"{path}:{lineno}: marked {' and '.join(marks)}; mark one of accept, edit, "
                                    f"reject")
            if not marks or marks[0] == "reject":
                continue
            question, answer = (row.get("question") or "").strip(), (row.get("answer") or "").strip()
            if not question or not answer:
                raise PipelineError(f"{path}:{lineno}: {marks[0]} with an empty question or answer")
            aliases = [a.strip() for a in (row.get("aliases") or "").split("|") if a.strip()]
            record = {"question": question, "answer": answer, "aliases": aliases}
            for k in ("group", "source"):
                if (row.get(k) or "").strip():
                    record[k] = row[k].strip()
            out.append(record)
    return out


def next_ids(existing: Sequence[str], n: int) -> List[str]:
    """`n` new ids after `existing`: the existing ids' prefix and width numbered on from their highest number
    (q126 -> q127, q128, ...), or d001, d002, ... for an empty set or ids without a number."""
    numbered = [m for i in existing if (m := re.fullmatch(r"(.*?)(\d+)", i))]
    if numbered:
        last = max(numbered, key=lambda m: int(m.group(2)))
        prefix, width, start = last.group(1), len(last.group(2)), int(last.group(2)) + 1
    else:
        prefix, width, start = "d", 3, 1
    taken, out, k = set(existing), [], start
    while len(out) < n:
        qid = f"{prefix}{k:0{width}d}"
        if qid not in taken:
            out.append(qid)
        k += 1
    return out


def accept(review_csv: str | Path, into: str | Path) -> Tuple[int, int]:
    """Append the accepted and edited rows of `review_csv` to the QA set `into` (created if missing) with new ids
    after its own; lines already there are kept byte for byte, and a question already in the set is not added
    twice (running accept again adds nothing). Returns (added, already there)."""
    import os

    from pipeline.core.data import load_qa

    review_csv, into = Path(review_csv), Path(into)
    rows = read_review(review_csv)
    existing = load_qa(str(into), key="--into") if into.is_file() and into.read_text(encoding="utf-8").strip() else []
    seen = {normalize(q.question) for q in existing}
    new = []
    for r in rows:
        if normalize(r["question"]) not in seen:
            seen.add(normalize(r["question"]))
            new.append(r)
    ids = next_ids([q.id for q in existing], len(new))
    old = into.read_text(encoding="utf-8") if into.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    text = old + "".join(json.dumps({"id": i, **r}, ensure_ascii=False) + "\n" for i, r in zip(ids, new))
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = into.with_name(into.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, into)  # never half-written
    return len(new), len(rows) - len(new)


def accept_main(argv: List[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.draft_qa accept",
                                     description="Add the accepted/edited rows of a review.csv to a QA set.")
    parser.add_argument("review_csv")
    parser.add_argument("--into", default=None, help="the QA set to append to (default: qa.jsonl next to the CSV)")
    args = parser.parse_args(argv)
    into = args.into or str(Path(args.review_csv).with_name("qa.jsonl"))
    try:
        added, present = accept(args.review_csv, into)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{into}: {added} questions added, {present} already there")
    return 0


# --- the command ---------------------------------------------------------------------------------------------------

def generator_path(cfg, aug_cfg, model_cfg) -> str:
    path = cfg.generator_path or aug_cfg.generator_path or model_cfg.instruct_path
    if not path:
        raise PipelineError("draft_qa.generator_path: not set, and neither is augment.generator_path nor "
                            "model.instruct_path; point it at a local instruct model")
    return path


def draft(cfg, data_cfg, model_cfg, gen_path: str, seed: int, out_dir: str | Path, device: str = "auto",
          generator=None) -> dict:
    """Draft, filter and write the candidates into `out_dir`; returns the stats. `generator`: an object with
    generate(prompts, first_index) and count_tokens(texts) (the tests pass a fake; default: core.generate's)."""
    from pipeline.core.data import load_qa
    from pipeline.core.generate import Generator, check_engine, release

    out_dir = Path(out_dir)
    template = load_template(cfg.prompts_dir, cfg.language, cfg.prompt)
    scored = load_qa(data_cfg.qa.path) if data_cfg.qa.path else []
    training = training_questions(data_cfg, cfg.augmented)
    if generator is None:
        check_engine(cfg.engine, device, key="draft_qa.engine")
        generator = Generator(gen_path, engine=cfg.engine, device=device, dtype=model_cfg.dtype,
                              batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                              trust_remote_code=model_cfg.trust_remote_code, key="draft_qa.generator_path",
                              json_schema=SCHEMA if cfg.engine == "vllm" else None)
    chunks = chunk_corpus(data_cfg.cpt.path, data_cfg.cpt.text_field, lambda t: generator.count_tokens([t]),
                          cfg.chunk_tokens)
    if cfg.max_chunks:
        chunks = chunks[:cfg.max_chunks]
    examples = "\n".join(q.question for q in scored[:cfg.examples])
    prompts = [template.format(passage=c.text, heading=c.heading or "-", examples=examples or "-")
               for c in chunks for _ in range(cfg.samples)]
    log.info("draft_qa: %d chunks x %d samples = %d prompts; generator %s", len(chunks), cfg.samples, len(prompts),
             gen_path)
    from tqdm.auto import tqdm

    t0, replies = time.time(), []
    step = cfg.batch_size
    with tqdm(total=len(prompts), desc="draft_qa", unit="prompt", dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), step):  # batch by batch for the bar; seeds follow the position
            replies += generator.generate(prompts[start:start + step], first_index=start)
            bar.update(min(step, len(prompts) - start))
    seconds = time.time() - t0
    release(generator if isinstance(generator, Generator) else None)  # before the closed-book model loads
    items = [{"chunk": i // cfg.samples, "reply": r, "parsed": parse_reply(r)} for i, r in enumerate(replies)]
    kept, rejected, counts = filter_candidates(items, chunks, scored, training,
                                               cfg.quote_similarity, cfg.duplicate_similarity)
    general = []
    if cfg.closed_book and kept:
        answers = closed_book_answers(model_cfg.path, [c["question"] for c in kept], cfg.closed_book_prompt,
                                      model_cfg, device)
        still = []
        for c, a in zip(kept, answers):
            if contains(a, c["answer"], c["aliases"]):
                counts["closed_book"] += 1
                counts["kept"] -= 1
                general.append({**c, "base_answer": a})
            else:
                still.append(c)
        kept = still
    for n, c in enumerate(kept, start=1):
        c["id"] = f"draft-{n:04d}"
        c["group"] = cfg.group or Path(c["source"].rsplit(":", 1)[0]).stem
    stats = {"generator": gen_path, "engine": cfg.engine, "chunks": len(chunks), "prompts": len(prompts),
             **counts, "generation_seconds": round(seconds, 2),
             "seconds_per_100_replies": round(100 * seconds / max(len(prompts), 1), 2)}
    out_dir.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: List[dict], fields: Optional[Sequence[str]] = None) -> None:
        with (out_dir / name).open("w", encoding="utf-8") as f:
            for r in rows:
                r = {k: r[k] for k in fields if k in r} if fields else {k: v for k, v in r.items() if k != "chunk"}
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    fields = ("id", "question", "answer", "aliases", "quote", "source", "group")
    dump("candidates.jsonl", kept, fields)
    dump("rejected.jsonl", rejected)
    dump("general_qa_candidates.jsonl", general, (*fields[1:], "base_answer"))
    write_json(out_dir / "draft_stats.json", stats)
    write_review(out_dir, kept, chunks, stats)
    log.info("draft_qa: %d candidates kept of %d replies; dropped %s; %s/review.html and review.csv to review",
             counts["kept"], len(replies), {r: counts[r] for r in REASONS if counts[r]} or "none", out_dir)
    return stats


def run(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from pipeline.core.config import DEMO_GENERATOR_PATH, DraftQAConfig, check_ranges, typed

    from pipeline.run import _quiet_libraries

    _quiet_libraries()  # library messages into run.log, not onto the console
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        draft_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DraftQAConfig), cfg.draft_qa))
        check_ranges(draft_cfg, "draft_qa")
        model_cfg, data_cfg, aug_cfg = (typed(cfg, s) for s in ("model", "data", "augment"))
        load_template(draft_cfg.prompts_dir, draft_cfg.language, draft_cfg.prompt)
        gen = generator_path(draft_cfg, aug_cfg, model_cfg)
        from pipeline.core.checkpoints import check_model_dir
        from pipeline.core.data import load_cpt_documents, load_qa
        from pipeline.run import _demo_builds

        load_cpt_documents(data_cfg.cpt.path, data_cfg.cpt.text_field)
        if data_cfg.qa.path:
            load_qa(data_cfg.qa.path)
        training_questions(data_cfg, draft_cfg.augmented)
        if model_cfg.build_demo_if_missing and _demo_builds(model_cfg, gen):
            from pipeline.demo_model import ensure_demo_generator_model, ensure_demo_instruct_model, ensure_demo_model

            base = ensure_demo_model(model_cfg.demo, model_cfg.path, model_cfg.max_seq_length)
            build = (ensure_demo_generator_model if Path(gen).resolve() == Path(DEMO_GENERATOR_PATH).resolve()
                     else ensure_demo_instruct_model)
            build(model_cfg.demo, base, gen, model_cfg.max_seq_length)
        check_model_dir(gen, key="draft_qa.generator_path")
        if draft_cfg.closed_book:
            check_model_dir(model_cfg.path, key="model.path")
        seed = int(cfg.seed) if draft_cfg.seed is None else draft_cfg.seed
        draft(draft_cfg, data_cfg, model_cfg, gen, seed, out_dir, str(cfg.device))
    except PipelineError as e:
        if cfg.get("debug"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"candidates: {out_dir}/candidates.jsonl; review: {out_dir}/review.html, {out_dir}/review.csv")
    return 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "accept":
        sys.exit(accept_main(sys.argv[2:]))
    import hydra

    @hydra.main(config_path="../conf", config_name="draft_qa", version_base="1.3")
    def hydra_main(cfg) -> None:
        status = run(cfg)
        if status:
            sys.exit(status)

    hydra_main()


if __name__ == "__main__":
    main()
