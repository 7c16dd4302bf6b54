"""Reading the user's files: CPT documents, SFT chat records and QA sets, in the formats they come in.

Every data path is a file, a directory (searched recursively) or a glob. A file is read by its suffix:

    .txt .md            one document per file
    .jsonl .json        JSON lines, or (.json) one array of objects
    .csv                a header row; every cell is read as a string
    .parquet .arrow     a table (.arrow: datasets' stream format or the Arrow IPC file format)
    a directory written by datasets' save_to_disk (state.json / dataset_dict.json): its rows ('train' split)

Tables are read through Hugging Face `datasets` (offline: pipeline/__init__.py), which converts them once to Arrow
files under its cache and memory-maps them, so a corpus of gigabytes is never held in memory. A text file is one
document and is read as it is. Columns are found by name (the data.<part>.*_field keys).

Every problem is reported in one line with the file, the line (JSON lines) or row (every other table) and the field,
before any model is loaded. The stages' cache keys hash the records read here (`fingerprint_*`), not the files: the
same records in another format or place reuse every stage.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional

from pipeline.core.content import check_documents, unencodable
from pipeline.core.outputs import PipelineError

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
CPT_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES  # documents: text files, or a text column of any table
RECORD_SUFFIXES = TABLE_SUFFIXES  # SFT and QA records
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
BATCH = 1000  # rows per batch when a corpus is streamed from its Arrow files

# Where `datasets` keeps the Arrow copies of the user's tables: run.py points it into the stage cache
# (`<cache.dir>/.datasets`), so copies of confidential data stay with the pipeline's outputs and go with them;
# None: datasets' own cache (HF_DATASETS_CACHE).
_datasets_cache: Optional[str] = None


def use_datasets_cache(path: Optional[str | Path]) -> None:
    global _datasets_cache
    _datasets_cache = str(path) if path else None


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


def is_saved_dataset(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def resolve_files(spec: str | None, key: str, suffixes: tuple[str, ...] = CPT_SUFFIXES) -> List[Path]:
    """A file, a saved dataset, a directory (searched recursively) or a glob → the sorted files (and saved
    datasets) with `suffixes` it holds."""
    if not spec:
        raise PipelineError(f"config key {key}: Missing mandatory value; set it on the command line ({key}=...) or in "
                            f"your data config (conf/data/own.yaml)")
    p = Path(spec)
    if p.is_file() or is_saved_dataset(p):
        files = [p]
    elif p.is_dir():
        saved = [d for d in p.rglob("*") if is_saved_dataset(d)]
        files = sorted(saved + [f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes
                                and not any(s in f.parents for s in saved)])
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file()
                       or is_saved_dataset(Path(f)))
    else:
        raise PipelineError(f"{key}={spec}: no such file or directory")
    files = [f for f in files if f.suffix in suffixes or f.is_dir()]
    if not files:
        raise PipelineError(f"{key}={spec}: no {'/'.join(suffixes)} files or saved datasets found")
    return files


# --- tables ---------------------------------------------------------------------------------------------------

class Table:
    """One file's rows: a datasets.Dataset (memory-mapped Arrow), or for JSON lines that Arrow cannot type (an
    object that changes shape from line to line) the objects as parsed. `where(i)` names row i as the user finds it:
    `file:line` in JSON lines, `file: row n` (from 1) elsewhere."""

    def __init__(self, path: Path, rows: Any, lines: Optional[List[int]] = None):
        self.path, self.rows, self._lines = path, rows, lines
        self.json_lines = path.suffix == ".jsonl" or (path.suffix == ".json" and not _is_json_array(path))

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        if not self.json_lines:
            return f"{self.path}: row {i + 1}"
        if self._lines is None:  # needed only to report a problem: the line of the i-th non-blank line
            self._lines = [n for n, line in enumerate(_read_text(self.path).splitlines(), start=1) if line.strip()]
        return f"{self.path}:{self._lines[i]}"

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        """(index, row) with the fields that are null or absent left out: in a table every row has every column."""
        for i, row in enumerate(self.rows):
            yield i, {k: v for k, v in row.items() if v is not None}

    def column_batches(self, name: str, hint: str) -> Iterator[tuple[int, list]]:
        """(index of the first row, values) of one column, BATCH rows at a time; a missing column is one error,
        `hint` its config key."""
        if not isinstance(self.rows, list):
            if len(self.rows) and name not in self.rows.column_names:
                raise PipelineError(f"{self.where(0)}: missing string field '{name}' ({hint}; columns: "
                                    f"{', '.join(self.rows.column_names)})")
            if len(self.rows):
                for start, batch in zip(range(0, len(self.rows), BATCH),
                                        self.rows.select_columns([name]).iter(batch_size=BATCH)):
                    yield start, batch[name]
            return
        for start in range(0, len(self.rows), BATCH):
            yield start, [r.get(name) for r in self.rows[start:start + BATCH]]


def _json_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")


def _is_json_array(path: Path) -> bool:
    return _json_head(path)[:1] == b"["


def _starts_with_object(path: Path) -> bool:
    """The first record is an object. (datasets reads a file of arrays as a column of strings.)"""
    head = _json_head(path)
    if path.suffix == ".json" and head[:1] == b"[":
        return head[1:].lstrip()[:1] in (b"{", b"]")
    return head[:1] in (b"{", b"")


def _json_by_hand(path: Path) -> Table:
    """The rows of a JSON file read with Python's json: for the errors Arrow reports without a line, and for files
    whose objects change shape from line to line."""
    if path.suffix == ".json" and _is_json_array(path):
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        for i, obj in enumerate(rows):
            if not isinstance(obj, dict):
                raise PipelineError(f"{path}: row {i + 1}: expected a JSON object, got {type(obj).__name__}")
        return Table(path, rows)
    parsed = list(iter_jsonl(path))
    return Table(path, [obj for _, obj in parsed], [n for n, _ in parsed])


def open_table(path: Path) -> Table:
    """Read one table file (or saved dataset) through `datasets`."""
    import datasets

    path = Path(path)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError) as e:
            raise PipelineError(f"{path}: not a readable saved dataset ({str(e).splitlines()[0][:160]})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise PipelineError(f"{path}: a dataset with the splits {', '.join(ds)}; point at one split's "
                                    f"directory (or name one 'train')")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return Table(path, ds)
    kwargs: dict = {}
    if path.suffix == ".csv":
        # Every cell a string, empty cells "": a QA answer "880" or an id "007" must not become a number.
        try:
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), None)
        except UnicodeDecodeError as e:
            raise PipelineError(f"{path}: not valid UTF-8 (byte {e.start})") from None
        if not header:
            return Table(path, [])
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "keep_default_na": False}
    if path.suffix in (".jsonl", ".json") and not _starts_with_object(path):
        return _json_by_hand(path)  # names the line that is not an object
    try:
        ds = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train",
                                   cache_dir=_datasets_cache, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets wraps every reader's error; find the line ourselves
        if path.suffix in (".jsonl", ".json"):
            return _json_by_hand(path)  # raises with file:line, or reads what Arrow could not type
        cause = e.__cause__ or e
        if isinstance(cause, ValueError) and "corresponds to no data" in str(cause):
            return Table(path, [])
        if isinstance(cause, UnicodeDecodeError):
            raise PipelineError(f"{path}: not valid UTF-8 (byte {cause.start})") from None
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise PipelineError(f"{path}: not a readable {path.suffix[1:]} file ({first})") from None
    return Table(path, ds)


# --- CPT documents --------------------------------------------------------------------------------------------

def iter_document_batches(spec: str | None, text_field: str = "text", key: str = "data.cpt.path"
                          ) -> Iterator[List[str]]:
    """The documents of a corpus, stripped, blank ones dropped, in batches, in file order: each .txt/.md file is one
    document, each row of a table one (its `text_field`). Streamed, so a corpus is never held in memory whole."""
    for f in resolve_files(spec, key, CPT_SUFFIXES):
        if f.suffix in TEXT_SUFFIXES:
            text = _read_text(f).strip()
            if text:
                yield [text]
            continue
        table, hint = open_table(f), f"{key.rsplit('.', 1)[0]}.text_field"
        for start, values in table.column_batches(text_field, hint):
            for j, text in enumerate(values):
                if not isinstance(text, str):  # absent and null are one thing in a table
                    what = "" if text is None else f", a {type(text).__name__}"
                    raise PipelineError(f"{table.where(start + j)}: missing string field '{text_field}' "
                                        f"({hint}{what})")
                if unencodable(text):  # JSON can hold a lone surrogate
                    check_documents([{"where": table.where(start + j), "text": text}])
            yield [t.strip() for t in values if t.strip()]


def load_cpt_documents(spec: str | None, text_field: str = "text", key: str = "data.cpt.path") -> List[str]:
    """Every document as a list (held text, the QA sets' size: held-out and replayed text)."""
    docs = [d for batch in iter_document_batches(spec, text_field, key) for d in batch]
    if not docs:
        raise PipelineError(f"{key}={spec}: the corpus is empty (all documents are blank)")
    return docs


def check_cpt_documents(spec: str | None, text_field: str = "text", key: str = "data.cpt.path") -> int:
    """Read every document once (for run.validate), holding one batch at a time; returns the document count."""
    n = sum(len(batch) for batch in iter_document_batches(spec, text_field, key))
    if not n:
        raise PipelineError(f"{key}={spec}: the corpus is empty (all documents are blank)")
    return n


# --- SFT records ----------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _turns(turns: Any, name: str, where: str) -> List[dict]:
    """A list of turns, each {role, content} or sharegpt's {from, value}, as chat messages."""
    if not isinstance(turns, list) or not turns:
        raise PipelineError(f"{where}: '{name}' must be a non-empty list of {{role, content}} or {{from, value}}")
    msgs = []
    for i, t in enumerate(turns):
        t = {k: v for k, v in t.items() if v is not None} if isinstance(t, dict) else t
        if isinstance(t, dict) and "from" in t:  # sharegpt
            if t["from"] not in SHAREGPT_ROLES:
                raise PipelineError(f"{where}: {name}[{i}].from={t['from']!r} (human, gpt or system)")
            if not isinstance(t.get("value"), str):
                raise PipelineError(f"{where}: {name}[{i}] needs a string 'value'")
            msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
            continue
        if not isinstance(t, dict) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
            raise PipelineError(f"{where}: {name}[{i}] needs string 'role' and 'content' (or sharegpt's 'from' "
                                f"and 'value')")
        if t["role"] not in ROLES:
            raise PipelineError(f"{where}: {name}[{i}].role={t['role']!r} (system, user or assistant)")
        msgs.append({"role": t["role"], "content": t["content"]})
    if msgs[-1]["role"] != "assistant":
        raise PipelineError(f"{where}: the last message must be the assistant's answer (role 'assistant', sharegpt "
                            f"'gpt')")
    return msgs


def _message_list(obj: dict, where: str, messages_field: str = "messages") -> List[dict]:
    """Normalise one SFT record (messages, sharegpt conversations, prompt/completion or alpaca's
    instruction/input/output) to chat messages."""
    for name in dict.fromkeys((messages_field, "messages", "conversations")):
        if name in obj:
            return _turns(obj[name], name, where)
    if "prompt" in obj and "completion" in obj:
        p, c = obj["prompt"], obj["completion"]
        if not isinstance(p, str) or not isinstance(c, str):
            raise PipelineError(f"{where}: 'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    if "instruction" in obj and "output" in obj:
        ins, inp, out = obj["instruction"], obj.get("input") or "", obj["output"]
        if not all(isinstance(x, str) for x in (ins, inp, out)):
            raise PipelineError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        return [{"role": "user", "content": f"{ins}\n\n{inp}" if inp else ins},
                {"role": "assistant", "content": out}]
    raise PipelineError(f"{where}: expected '{messages_field}', 'conversations', 'prompt'+'completion' or "
                        f"'instruction'+'output' fields, got {sorted(obj)}")


def load_sft_records(spec: str | None, key: str = "data.sft.path", messages_field: str = "messages",
                     where: bool = False) -> List:
    """Each record as chat messages; `where=True`: as {"where": "file:line", "messages": [...]} (for the content
    checks of pipeline/core/content.py)."""
    records = []
    for f in resolve_files(spec, key, RECORD_SUFFIXES):
        table = open_table(f)
        for i, obj in table:
            messages = _message_list(obj, table.where(i), messages_field)
            records.append({"where": table.where(i), "messages": messages} if where else messages)
    if not records:
        raise PipelineError(f"{key}={spec}: no SFT records")
    return records


# --- QA sets --------------------------------------------------------------------------------------------------

@dataclass
class QAItem:
    id: str
    question: str
    answer: str
    aliases: List[str] = field(default_factory=list)
    group: Optional[str] = None  # optional label; metrics are also reported per group (e.g. cpt/contains@faq)
    where: str = ""  # file:line, for the content checks' messages


def _csv_aliases(value: Any) -> Any:
    """A CSV cell cannot hold a list: aliases are written `770t|七百七十トン` or as a JSON array."""
    if not isinstance(value, str):
        return value
    if value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return [a for a in value.split("|") if a.strip()]


def load_qa(spec: str | None, key: str = "data.qa.path", question_field: str = "question",
            answer_field: str = "answer", id_field: str = "id") -> List[QAItem]:
    """QA records: `question_field`, `answer_field`, optional `id_field` (default `<file stem>:<line or row>`),
    `aliases` (a list; in CSV `a|b` or a JSON array) and `group`."""
    items: List[QAItem] = []
    seen: dict[str, str] = {}
    for f in resolve_files(spec, key, RECORD_SUFFIXES):
        table = open_table(f)
        for i, obj in table:
            where = table.where(i)
            if f.suffix == ".csv":  # an empty cell is an absent value
                obj = {k: v for k, v in obj.items() if v != ""}
                if "aliases" in obj:
                    obj["aliases"] = _csv_aliases(obj["aliases"])
            for k in (question_field, answer_field):
                if not isinstance(obj.get(k), str) or not obj[k].strip():
                    raise PipelineError(f"{where}: QA record without a non-empty string '{k}'")
            aliases = obj.get("aliases") or []
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise PipelineError(f"{where}: 'aliases' must be a list of strings")
            group = obj.get("group")
            if group is not None and not isinstance(group, str):
                raise PipelineError(f"{where}: 'group' must be a string")
            n = where.rsplit(":", 1)[1] if table.json_lines else str(i + 1)
            qid = str(obj.get(id_field, f"{f.stem}:{n}"))
            if qid in seen:
                raise PipelineError(f"{where}: duplicate id {qid!r} (first at {seen[qid]})")
            seen[qid] = where
            items.append(QAItem(qid, obj[question_field].strip(), obj[answer_field].strip(),
                                [a.strip() for a in aliases], group, where))
    if not items:
        raise PipelineError(f"{key}={spec}: no QA records")
    return items


def explicit_ids(spec: str, key: str, id_field: str = "id") -> dict:
    """The ids as written in the files, with where each first appears (load_qa invents `<stem>:<line>` ids for
    records without one, which would collide between two files of the same name without meaning anything)."""
    out = {}
    for f in resolve_files(spec, key, RECORD_SUFFIXES):
        table = open_table(f)
        for i, obj in table:
            if obj.get(id_field, "") != "":
                out.setdefault(str(obj[id_field]), table.where(i))
    return out


# --- fingerprints: what the cache keys hash -------------------------------------------------------------------

def _stamp(spec: str, key: str, suffixes: tuple) -> tuple:
    """Which files, of what size and age: a memo's key, so a corpus is hashed once per process, not per stage."""
    out = []
    for f in resolve_files(spec, key, suffixes):
        for g in ([f] if f.is_file() else sorted(x for x in f.rglob("*") if x.is_file())):
            st = g.stat()
            out.append((str(g.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


_memo: dict = {}


def _memoized(what: tuple, compute) -> str:
    if what not in _memo:
        if len(_memo) >= 8:  # a few data parts; never grows with a sweep
            _memo.pop(next(iter(_memo)))
        _memo[what] = compute()
    return _memo[what]


def fingerprint_documents(spec: str, text_field: str = "text", key: str = "data.cpt.path") -> str:
    """Hash of the documents as CPT reads them (stripped, blank ones dropped, in order): the same corpus as .md
    files, JSON lines, parquet or a saved dataset gets the same hash."""
    def compute():
        h = hashlib.sha256()
        for batch in iter_document_batches(spec, text_field, key):
            for doc in batch:
                h.update(doc.encode("utf-8") + b"\0")
        return h.hexdigest()

    return _memoized(("documents", spec, text_field, key, _stamp(spec, key, CPT_SUFFIXES)), compute)


def _fingerprint(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    return h.hexdigest()


def fingerprint_sft(spec: str, key: str = "data.sft.path", messages_field: str = "messages") -> str:
    """Hash of the SFT records as chat messages: sharegpt, messages, prompt/completion or alpaca, in any format."""
    return _fingerprint(load_sft_records(spec, key, messages_field))


def fingerprint_qa(spec: str, key: str = "data.qa.path", **fields) -> str:
    """Hash of the QA records as scored (ids included: answers.jsonl names them; where they were read, not)."""
    return _fingerprint({k: v for k, v in asdict(q).items() if k != "where"} for q in load_qa(spec, key, **fields))


def qa_fields(part) -> dict:
    """The field-mapping keys of a QA-shaped data part (config.DataPath) as load_qa's arguments."""
    return {"question_field": part.question_field, "answer_field": part.answer_field, "id_field": part.id_field}


def qa_source(part) -> tuple:
    """(path, load_qa's field arguments) of a QA set given as a config.DataPath or as a plain path."""
    if part is None or isinstance(part, (str, Path)):
        return (str(part) if part else None), {}
    return part.path, qa_fields(part)
