"""benchmarks/gpu_backends.py: how its table is judged (fast), and its CPU smoke run end to end (slow).

    python -m pytest tests/test_gpu_backends.py -q            # the rules: skipped rows, mislabelled rows, agreement
    python -m pytest -m slow tests/test_gpu_backends.py -q    # python benchmarks/gpu_backends.py --smoke, ~1 minute

The benchmark's real figures need a CUDA GPU; what a CPU can check is that a row never carries a number it did not
measure, that a loss disagreement is called one, and that the script runs the pipeline's stages and reads their files.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_backends  # noqa: E402

CELL = {"model": "llama-1b-random", "precision": "bf16", "parameters_m": 1868.0}


def ok_result(backend: str, first: float, mean: float, final: float) -> dict:
    """What a cell's child process writes (result.json) after CPT and the merge ran."""
    return {"backend_used": backend, "wall_seconds": 60.0, "log": "cell.log",
            "stages": {"cpt": {"seconds": 40.0, "peak_bytes": 12 * 2 ** 30, "allocated_before_bytes": 0},
                       "merge": {"seconds": 9.0, "peak_bytes": 8 * 2 ** 30, "allocated_before_bytes": 0}},
            "cpt": {"steps": 200, "tokens_per_second": 9000.0, "train_loss": mean, "final_loss": final,
                    "loss_history": [[10, first], [200, final]]},
            "merge": {"max_abs_logit_diff": 3e-5, "tolerance": 1.2e-3, "reload_max_abs_logit_diff": 0.0,
                      "save_dtype": "bfloat16", "quantized_training_drift": None}}


def rows(unsloth_first: float, unsloth_mean: float, unsloth_final: float = 9.0) -> list:
    return [gpu_backends.row_of({**CELL, "backend": "hf"}, ok_result("hf", 11.0, 10.0, 9.0), None),
            gpu_backends.row_of({**CELL, "backend": "unsloth"},
                                ok_result("unsloth", unsloth_first, unsloth_mean, unsloth_final), None)]


def test_a_row_carries_the_cells_own_figures():
    row = rows(11.0, 10.0)[1]
    assert row["status"] == "ok"
    assert (row["cpt_tokens_per_s"], row["cpt_loss_first"], row["cpt_loss_mean"]) == (9000.0, 11.0, 10.0)
    assert (row["merge_max_abs_dlogit"], row["merge_tolerance"], row["cpt_peak_gib"]) == (3e-5, 1.2e-3, 12.0)


def test_losses_agree_within_rtol_on_mean_and_first_loss_only():
    same = gpu_backends.loss_agreement(rows(11.1, 10.1, unsloth_final=12.0), rtol=0.02)[0]
    assert same["agree"] is True  # 0.9% and 1%; the final loss (33% off) is shown, not judged
    assert same["rel_diff_mean"] == pytest.approx(0.01) and same["rel_diff_final"] == pytest.approx(1 / 3)
    assert gpu_backends.loss_agreement(rows(11.0, 10.3), rtol=0.02)[0]["agree"] is False  # mean 3% off
    assert gpu_backends.loss_agreement(rows(11.5, 10.0), rtol=0.02)[0]["agree"] is False  # first logged loss 4.5% off


def test_a_skipped_or_mislabelled_cell_gives_no_numbers_and_no_agreement():
    skipped = gpu_backends.row_of({**CELL, "backend": "unsloth"}, None, "skipped: unsloth is not installed")
    assert skipped["status"] == "skipped: unsloth is not installed"
    assert not any(k.startswith(("cpt_", "merge_")) for k in skipped)
    hf = rows(11.0, 10.0)[0]
    verdict = gpu_backends.loss_agreement([hf, skipped], rtol=0.02)[0]["agree"]
    assert verdict == "n/a: unsloth skipped: unsloth is not installed"
    # a run that fell back to the plain path must not be reported as unsloth's figures
    fell_back = gpu_backends.row_of({**CELL, "backend": "unsloth"}, ok_result("hf", 11.0, 10.0, 9.0), None)
    assert fell_back["status"].startswith("failed: the run used backend 'hf'")
    assert gpu_backends.loss_agreement([hf, fell_back], rtol=0.02)[0]["agree"].startswith("n/a: unsloth failed")


def test_skip_reasons(monkeypatch):
    assert gpu_backends.skip_reason("hf", "bf16", cuda=False, smoke=False).startswith("skipped: no CUDA GPU")
    assert gpu_backends.skip_reason("hf", "fp32", cuda=False, smoke=True) is None  # the smoke check runs
    assert "needs a CUDA GPU" in gpu_backends.skip_reason("unsloth", "fp32", cuda=False, smoke=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("unsloth", "bitsandbytes")
                        else real(name, *a))
    assert "unsloth is not installed" in gpu_backends.skip_reason("unsloth", "bf16", cuda=True, smoke=False)
    assert "bitsandbytes is not installed" in gpu_backends.skip_reason("hf", "4bit", cuda=True, smoke=False)
    assert gpu_backends.skip_reason("hf", "bf16", cuda=True, smoke=False) is None


@pytest.mark.slow
def test_smoke_runs_the_pipeline_and_writes_the_table(tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("the 4-bit smoke cell needs bitsandbytes (the test extra)")
    r = subprocess.run([sys.executable, "benchmarks/gpu_backends.py", "--smoke", "--precisions", "fp32,4bit",
                        "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["device"].startswith("cpu") and report["smoke"] is True
    by_cell = {(row["precision"], row["backend"]): row for row in report["rows"]}
    for precision in ("fp32", "4bit"):
        hf = by_cell[(precision, "hf")]
        assert hf["status"] == "ok", hf["status"]
        assert hf["cpt_steps"] == 4 and hf["cpt_tokens_per_s"] > 0 and hf["cpt_loss_mean"] > 0
        assert hf["merge_max_abs_dlogit"] <= hf["merge_tolerance"]
        assert set(hf) >= {"sft_seconds", "eval_seconds", "sft_contains"}  # all four stages ran
        assert by_cell[(precision, "unsloth")]["status"].startswith("skipped: backend=unsloth needs a CUDA GPU")
    assert by_cell[("4bit", "hf")]["qlora_drift_max_dlogit"] > 0  # the merge measured QLoRA's drift
    assert by_cell[("fp32", "hf")]["qlora_drift_max_dlogit"] is None
    assert [a["agree"].split(":")[0] for a in report["loss_agreement"]] == ["n/a", "n/a"]
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 1 + 4
    assert not list((tmp_path / "out").rglob("*.safetensors"))  # merged models are not kept
    assert "CPT loss agreement" in r.stdout and "tiny" in r.stdout
