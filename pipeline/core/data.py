"""Reading the user's files: CPT documents, SFT chat records and the QA set.

Every problem is reported with the file, the line and the key, before any model is loaded.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

from pipeline.core.content import check_documents
from pipeline.core.outputs import PipelineError

CPT_SUFFIXES = (".txt", ".md", ".jsonl")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read ({e.strerror})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a malformed line stops with file:line."""
    path = Path(path)
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PipelineError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def resolve_files(spec: str | None, key: str, suffixes: tuple[str, ...]) -> List[Path]:
    """A file, a directory (searched recursively) or a glob pattern → sorted list of files with `suffixes`."""
    if not spec:
        raise PipelineError(f"config key {key}: Missing mandatory value; set it on the command line ({key}=...) or in "
                            f"your data config (conf/data/own.yaml)")
    p = Path(spec)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    else:
        raise PipelineError(f"{key}={spec}: no such file or directory")
    files = [f for f in files if f.suffix in suffixes]
    if not files:
        raise PipelineError(f"{key}={spec}: no {'/'.join(suffixes)} files found")
    return files


def load_cpt_documents(spec: str | None, text_field: str = "text", key: str = "data.cpt.path") -> List[str]:
    """Raw documents for CPT: each .txt/.md file is one document; each .jsonl line's `text_field` is one."""
    docs: List[str] = []
    for f in resolve_files(spec, key, CPT_SUFFIXES):
        if f.suffix == ".jsonl":
            for lineno, obj in iter_jsonl(f):
                text = obj.get(text_field)
                if not isinstance(text, str):
                    raise PipelineError(f"{f}:{lineno}: missing string field '{text_field}' (data.cpt.text_field)")
                check_documents([{"where": f"{f}:{lineno}", "text": text}])  # JSON can hold a lone surrogate
                if text.strip():
                    docs.append(text.strip())
        else:
            text = _read_text(f).strip()
            if text:
                docs.append(text)
    if not docs:
        raise PipelineError(f"{key}={spec}: the corpus is empty (all documents are blank)")
    return docs


def _message_list(obj: dict, f: Path, lineno: int) -> List[dict]:
    """Normalise one SFT record (messages, prompt/completion or instruction/input/output) to chat messages."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise PipelineError(f"{f}:{lineno}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise PipelineError(f"{f}:{lineno}: messages[{i}] needs string 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise PipelineError(f"{f}:{lineno}: messages[{i}].role={m['role']!r} (system, user or assistant)")
        if msgs[-1]["role"] != "assistant":
            raise PipelineError(f"{f}:{lineno}: the last message must be the assistant's answer (role 'assistant')")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in obj and "completion" in obj:
        p, c = obj["prompt"], obj["completion"]
        if not isinstance(p, str) or not isinstance(c, str):
            raise PipelineError(f"{f}:{lineno}: 'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    if "instruction" in obj and "output" in obj:
        ins, inp, out = obj["instruction"], obj.get("input") or "", obj["output"]
        if not all(isinstance(x, str) for x in (ins, inp, out)):
            raise PipelineError(f"{f}:{lineno}: 'instruction', 'input' and 'output' must be strings")
        return [{"role": "user", "content": f"{ins}\n\n{inp}" if inp else ins},
                {"role": "assistant", "content": out}]
    raise PipelineError(
        f"{f}:{lineno}: expected 'messages', 'prompt'+'completion' or 'instruction'+'output' keys, got {sorted(obj)}"
    )


def load_sft_records(spec: str | None, key: str = "data.sft.path", where: bool = False) -> List:
    """Each record as chat messages; `where=True`: as {"where": "file:line", "messages": [...]} (for the content
    checks of pipeline/core/content.py)."""
    records = []
    for f in resolve_files(spec, key, (".jsonl",)):
        for lineno, obj in iter_jsonl(f):
            messages = _message_list(obj, f, lineno)
            records.append({"where": f"{f}:{lineno}", "messages": messages} if where else messages)
    if not records:
        raise PipelineError(f"{key}={spec}: no SFT records")
    return records


@dataclass
class QAItem:
    id: str
    question: str
    answer: str
    aliases: List[str] = field(default_factory=list)
    group: Optional[str] = None  # optional label; metrics are also reported per group (e.g. cpt/contains@faq)
    where: str = ""  # file:line, for the content checks' messages


def load_qa(spec: str | None, key: str = "data.qa.path") -> List[QAItem]:
    items: List[QAItem] = []
    seen: dict[str, str] = {}
    for f in resolve_files(spec, key, (".jsonl",)):
        for lineno, obj in iter_jsonl(f):
            where = f"{f}:{lineno}"
            for k in ("question", "answer"):
                if not isinstance(obj.get(k), str) or not obj[k].strip():
                    raise PipelineError(f"{where}: QA record without a non-empty string '{k}'")
            aliases = obj.get("aliases") or []
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise PipelineError(f"{where}: 'aliases' must be a list of strings")
            group = obj.get("group")
            if group is not None and not isinstance(group, str):
                raise PipelineError(f"{where}: 'group' must be a string")
            qid = str(obj.get("id", f"{f.stem}:{lineno}"))
            if qid in seen:
                raise PipelineError(f"{where}: duplicate id {qid!r} (first at {seen[qid]})")
            seen[qid] = where
            items.append(QAItem(qid, obj["question"].strip(), obj["answer"].strip(), [a.strip() for a in aliases],
                                group, where))
    if not items:
        raise PipelineError(f"{key}={spec}: no QA records")
    return items
