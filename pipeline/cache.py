"""Content-addressed stage cache: each stage's output lives under a key that hashes exactly what it depends on.

    python -m pipeline.cache list                   # what is cached, per stage, with sizes and last use
    python -m pipeline.cache prune --older-than 7   # delete entries not used for 7 days
    python -m pipeline.cache prune --stage sft      # or one stage's entries; --all for everything

Keys chain: CPT = model identity + CPT data fingerprint + cpt config + seed; merge = CPT key + merge config;
SFT = merge key + SFT data fingerprint + sft config + seed; eval = SFT key + QA fingerprint + eval config. Each also
holds the model settings the stage reads and a per-stage version constant (bump it when a stage's code changes what
it produces). Operational settings (device, logging, output paths, worker counts) never enter a key. run.py's
stage_materials assembles every stage's material before the first stage runs.

A build happens under a file lock, into a temporary directory renamed into place after its completion marker is
written (outputs.atomic_output): concurrent jobs wait for one builder, and an interrupted build is never reused as an
output. CPT and SFT build in `<key>.build/` (outputs.resumable_output), whose trainer checkpoints the next build of
the same key resumes from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Tuple

from pipeline.core.outputs import COMPLETE_MARKER, is_complete

log = logging.getLogger(__name__)

# Bump a stage's version when its code changes what it produces: old entries then stop matching.
# eval 2: Japanese-aware normalisation (kanji numerals, units, copula), transitions, general QA, held-out perplexity.
# cpt 2: epochs are read one after another (each packing's blocks shuffled within it), no longer mixed.
# merge 2: streamed from the base's safetensors. sft 2: prompt_format.json beside the adapter. eval 3: numbers
# matched as whole numbers, one answer-cutting rule, summed judge log-probs, gain_kept/* metrics.
STAGE_VERSIONS = {"augment": 1, "cpt": 2, "merge": 2, "chat_vector": 1, "sft": 2, "eval": 3, "export": 1}
LAST_USED = ".last_used"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_files(files: Iterable[Path]) -> str:
    """Hash of the files' names and contents (corpora and QA sets are small enough to read)."""
    h = hashlib.sha256()
    for f in sorted(Path(x) for x in files):
        h.update(f.name.encode() + b"\0" + _sha(f.read_bytes()).encode() + b"\0")
    return h.hexdigest()


def fingerprint_model(path: str | os.PathLike) -> str:
    """Identity of a checkpoint directory without reading gigabytes: a completed stage output is identified by its
    own cache key (its directory name under the cache); a snapshot of the Hugging Face cache by its repo and commit;
    any other directory by its resolved path and each file's name, size and modification time (a rebuilt or
    replaced model gets a new identity)."""
    p = Path(path).resolve()
    if is_complete(p) and (p.parent.parent / ".pipeline-cache").is_file():
        return f"cache:{p.parent.name}/{p.name}"
    from pipeline.core.checkpoints import hub_snapshot

    snapshot = hub_snapshot(p)
    if snapshot:  # a checkpoint in the Hugging Face cache: its commit says what it holds, wherever the cache is
        return f"hf:{snapshot[0]}@{snapshot[1]}"
    h = hashlib.sha256(str(p).encode())
    for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def stage_key(stage: str, material: dict) -> str:
    """A short stable hash of a stage's dependencies (dataclasses are hashed by their fields)."""

    def plain(x: Any) -> Any:
        if is_dataclass(x):
            return asdict(x)
        return x

    blob = json.dumps({"stage": stage, "version": STAGE_VERSIONS[stage],
                       **{k: plain(v) for k, v in material.items()}}, sort_keys=True, default=str)
    return _sha(blob.encode())[:16]


class StageCache:
    """Stage outputs under `<root>/<stage>/<key>/`; `enabled=False` builds every stage afresh (benchmarks)."""

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root = Path(root).resolve()
        self.enabled = enabled
        if enabled:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".pipeline-cache").write_text("stage cache of pipeline.run\n")

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get_or_build(self, stage: str, key: str, build: Callable[[Path], Any], material: Optional[dict] = None
                     ) -> Tuple[Path, bool]:
        """Return (output path, reused?). `build(path)` must create `path` atomically (atomic_output)."""
        from filelock import FileLock

        final = self.path(stage, key)
        if is_complete(final):
            _touch(final)
            return final, True
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if is_complete(final):  # another job built it while we waited for the lock
                _touch(final)
                return final, True
            if final.exists():  # not ours and not complete (e.g. copied in by hand): never trust it
                shutil.rmtree(final)
            build(final)
            if material is not None:
                (final.parent / f"{key}.json").write_text(json.dumps(material, default=str, ensure_ascii=False,
                                                                     indent=1), encoding="utf-8")
            _touch(final)
        return final, False


def _touch(path: Path) -> None:
    tmp = path / f"{LAST_USED}.{os.getpid()}"
    tmp.write_text(f"{time.time():.0f}\n")
    os.replace(tmp, path / LAST_USED)  # a reader never sees a half-written time


def _entries(root: Path):
    # (.datasets holds datasets' Arrow copies of the data files read, pipeline/core/data.py: not a stage)
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            yield stage_dir.name, entry


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _last_used(entry: Path) -> float:
    try:
        return float((entry / LAST_USED).read_text())
    except (OSError, ValueError):
        return entry.stat().st_mtime


def list_entries(root: Path) -> list:
    rows = []
    for stage, entry in _entries(root):
        state = ("complete" if (entry / COMPLETE_MARKER).is_file() else "building or interrupted (resumed by the next "
                 "build)" if entry.name.endswith(".build") else "partial (never reused)")
        rows.append({"stage": stage, "key": entry.name, "state": state, "MB": round(_size(entry) / 2**20, 1),
                     "days_unused": round((time.time() - _last_used(entry)) / 86400, 1)})
    return rows


def prune(root: Path, older_than_days: Optional[float] = None, stage: Optional[str] = None,
          everything: bool = False) -> list:
    """Delete entries matching the filters (all filters given must match; --all alone matches every entry).

    A stage that a running job is *reading* is not locked: prune entries that no running sweep needs.

    Leftovers of interrupted builds (`<key>.tmp-*`, and `<key>.build` with the checkpoints a re-run would resume
    from) are always deleted, unless a builder still holds the key's lock.
    """
    from filelock import FileLock, Timeout

    removed = []
    for st, entry in list(_entries(root)):
        key = entry.name.split(".tmp-")[0].removesuffix(".build")
        partial = not (entry / COMPLETE_MARKER).is_file()
        if partial:
            try:
                with FileLock(str(entry.with_name(key + ".lock")), timeout=0):
                    shutil.rmtree(entry, ignore_errors=True)
                removed.append(f"{st}/{entry.name} (interrupted build)")
            except Timeout:
                pass  # being built right now
            continue
        matches = (
            (stage is None or st == stage)
            and (older_than_days is None or time.time() - _last_used(entry) > older_than_days * 86400)
            and (everything or stage is not None or older_than_days is not None)
        )
        if not matches:
            continue
        try:  # a job that is building this key holds its lock: leave it alone
            with FileLock(str(entry.with_name(key + ".lock")), timeout=0):
                shutil.rmtree(entry, ignore_errors=True)
                entry.with_name(key + ".json").unlink(missing_ok=True)
            removed.append(f"{st}/{key}")
        except Timeout:
            pass
    return removed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="outputs/cache", help="cache root (the cache.dir config key)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list cached stage outputs")
    p = sub.add_parser("prune", help="delete cached stage outputs")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="entries not used for DAYS days")
    p.add_argument("--stage", choices=sorted(STAGE_VERSIONS), help="only this stage's entries")
    p.add_argument("--all", action="store_true", help="every entry")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: --root {root}: no cache there", file=sys.stderr)
        return 2
    if args.command == "list":
        rows = list_entries(root)
        if not rows:
            print(f"{root}: empty")
        for r in rows:
            print(f"{r['stage']:6} {r['key']}  {r['MB']:8.1f} MB  unused {r['days_unused']:5.1f} d  {r['state']}")
        return 0
    if args.older_than is None and args.stage is None and not args.all:
        print("error: prune needs --older-than DAYS, --stage STAGE or --all", file=sys.stderr)
        return 2
    for r in prune(root, args.older_than, args.stage, args.all):
        print(f"removed {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
