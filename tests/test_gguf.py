"""export.gguf through llama.cpp's own converter, each file verified (pipeline/core/gguf_export.py).

Slow, and skipped with the reason when the converter is not installed: `make gguf-converter` unpacks it from
llama-cpp-python's source distribution into .venv/llama.cpp (README, "Running your model"); then
`python -m pytest -m slow tests/test_gguf.py` (about 3 minutes on 2 CPU cores, most of it SmolLM2's export).
"""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import tiny_overrides
from pipeline.core.outputs import PipelineError
from pipeline.run import run_pipeline
from test_export import FULL, compose_cfg
from test_smollm2 import smollm2  # noqa: F401  (the SmolLM2-135M-Instruct checkpoint, built once)

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / ".venv" / "llama.cpp"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converter():
    if not (CONVERTER / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converter is not at {CONVERTER}: make gguf-converter installs it")
    for module in ("sentencepiece", "gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the converter needs {module}: pip install -e \".[gguf]\"")
    return CONVERTER


def test_smollm2_f16_and_q8_0_are_verified(converter, smollm2, tmp_path):  # noqa: F811
    cfg = compose_cfg(["model=smollm2_135m", f"model.path={smollm2}", 'data.cpt.path="data/cpt/設備台帳.md"',
                       "data.sft.path=data/sft/chat.jsonl", "data.qa.path=eval_sets/qa.jsonl",
                       f"cache.dir={tmp_path / 'cache'}", "cpt.max_steps=2", "cpt.batch_size=2", "sft.max_steps=2",
                       "sft.batch_size=2", "eval.max_questions=4", "eval.max_new_tokens=8", f"stages={FULL}",
                       "export.gguf=[f16,q8_0]", f"export.llama_cpp={converter}"])
    run_pipeline(cfg, tmp_path / "run")
    check = json.loads((tmp_path / "run" / "export" / "export_check.json").read_text())
    assert [g["type"] for g in check["gguf"]] == ["f16", "q8_0"]
    for g in check["gguf"]:
        assert g["architecture"] == "llama" and g["tensors"] == g["checkpoint_tensors"] == 272
        assert g["pre_tokenizer"] == "smollm" and g["questions_round_tripped"] == 126
        assert g["logits"]["max_abs_logit_diff"] <= g["logits"]["tolerance"]
    f16, q8 = check["gguf"]
    assert q8["bytes"] < 0.6 * f16["bytes"]  # 8.5 bits a weight vs 16
    assert f16["logits"]["max_abs_logit_diff"] < q8["logits"]["max_abs_logit_diff"]
    assert check["answers"]["answers_same_as_eval"] == 4


def test_trained_bpe_tokenizer_is_refused_in_one_line(converter, tiny_model, data_files, tmp_path):
    """A byte-level BPE trained for the model (the demo's, the tests' tiny model's): llama.cpp identifies BPE
    pre-tokenizers by a hash of their output, and this one is not in its list. Nothing is published."""
    cfg = compose_cfg(tiny_overrides(tiny_model, data_files, stages=FULL, **{
        "export.gguf": "[f16]", "export.llama_cpp": converter}))
    with pytest.raises(PipelineError, match="BPE pre-tokenizer is not one llama.cpp knows"):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "export").exists()
