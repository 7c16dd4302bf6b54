"""What a stage output is and where it came from, recorded beside it (lineage.json) and checked when a later run
reads it through inputs.*: a CPT adapter given as a CPT model, or a CPT model built on another base, would otherwise
load (PEFT follows the base path inside adapter_config.json) and produce a table comparing unrelated models.

    {"kind": "cpt_model", "id": "3f2a...", "base": {"path": "/models/x", "identity": "9c1e..."},
     "parent": {"kind": "cpt_adapter", "id": "77b0..."}}

`base.identity` is checkpoints.model_identity of model.path: the weights, not the path, so a copied base matches and
a replaced one does not. `parent` is the output this one was made from (the adapter a model was merged from, the
model an SFT adapter was trained on).
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Optional

from pipeline.core.checkpoints import model_identity
from pipeline.core.outputs import PipelineError, write_json

log = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"
# Outputs written before lineage.json existed are told apart by the stats file their stage always wrote.
_STATS_FILES = {"cpt_stats.json": "cpt_adapter", "merge_check.json": "cpt_model", "sft_stats.json": "sft_adapter",
                "chat_vector.json": "chat_vector_model"}


def write_lineage(out_dir, kind: str, base_path, parent=None) -> None:
    """Record, inside a stage's output before it is published, what it is, its base and the output it came from."""
    up = read_lineage(parent) if parent else None
    write_json(Path(out_dir) / LINEAGE_FILE, {
        "kind": kind, "id": uuid.uuid4().hex[:16],
        "base": {"path": str(Path(base_path).resolve()), "identity": model_identity(base_path)},
        "parent": {"kind": up["kind"], "id": up["id"]} if up else None})


def read_lineage(path) -> Optional[dict]:
    file = Path(path) / LINEAGE_FILE
    if not file.is_file():
        return None
    try:
        rec = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(rec["kind"], str) and isinstance(rec["id"], str) and isinstance(rec["base"]["identity"], str):
            return rec
    except (ValueError, KeyError, TypeError):
        pass
    raise PipelineError(f"{file}: not a lineage record (JSON with kind, id and base)")


def kind_of(path) -> Optional[str]:
    """What a stage output is: its lineage record, else (older outputs) the stats file its stage wrote."""
    rec = read_lineage(path)
    if rec:
        return rec["kind"]
    return next((k for f, k in _STATS_FILES.items() if (Path(path) / f).is_file()), None)


def check_input(path, key: str, expected: str, base_path) -> Optional[dict]:
    """inputs.<key>=path must be an `expected` output built on the model at `base_path` (None: not checked, e.g.
    the demo model is not built yet). Returns its lineage record (None for an output older than lineage.json)."""
    rec, kind = read_lineage(path), kind_of(path)
    if kind and kind != expected:
        raise PipelineError(f"inputs.{key}={path}: holds kind={kind}; inputs.{key} needs kind={expected} (the "
                            f"{expected} directory of an earlier run)")
    if rec is None:
        # Accepted: refusing would throw away every cached output trained before the record existed (hours of
        # CPT); what can still be checked (the kind, from its stats file) was.
        log.warning("inputs.%s=%s: no %s (an output from before lineage was recorded): its base model cannot be "
                    "checked; it must have been built on model.path", key, path, LINEAGE_FILE)
        return None
    if base_path is not None and Path(base_path).is_dir() and rec["base"]["identity"] != model_identity(base_path):
        raise PipelineError(f"inputs.{key}={path}: built on the base model {rec['base']['path']}, not on "
                            f"model.path={base_path} (other weights); use outputs of the same base model")
    return rec


def check_pair(sft_adapter, cpt_model) -> None:
    """The SFT adapter must have been trained on this CPT model (eval loads it on top of it)."""
    sft, cpt = read_lineage(sft_adapter), read_lineage(cpt_model)
    if sft and cpt and sft.get("parent") and sft["parent"]["id"] != cpt["id"]:
        raise PipelineError(f"inputs.sft_adapter={sft_adapter}: trained on another {sft['parent']['kind']} "
                            f"({sft['parent']['id']}), not on {cpt_model} ({cpt['id']}), which eval would load it on; "
                            f"set inputs.cpt_model to the model it was trained on")
