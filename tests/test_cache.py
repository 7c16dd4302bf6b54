"""The stage cache: stable keys, one build per key under concurrency, interrupted builds never reused."""

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from conftest import tiny_overrides
from pipeline.cache import StageCache, list_entries, main as cache_main, prune, stage_key
from pipeline.core.outputs import atomic_output, is_complete
from pipeline.run import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_keys_follow_dependencies_not_operations(tiny_model, data_files, tmp_path):
    cache = tmp_path / "cache"
    first = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, **{"cache.dir": cache})), tmp_path / "a")
    assert [first[f"stage/{s}"] for s in ("cpt", "merge", "sft", "eval")] == ["built"] * 4

    # operational changes only: everything is reused, under the same keys
    same = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, **{
        "cache.dir": cache, "cpt.logging_steps": 1, "eval.batch_size": 1, "debug": "true"})), tmp_path / "b")
    assert [same[f"stage/{s}"] for s in ("cpt", "merge", "sft", "eval")] == ["reused"] * 4
    assert all(same[f"key/{s}"] == first[f"key/{s}"] for s in ("cpt", "merge", "sft", "eval"))
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["sft/contains"] == first["sft/contains"]
    assert (tmp_path / "b" / "cpt_adapter").is_symlink() and is_complete(tmp_path / "b" / "cpt_adapter")

    # an SFT change keeps CPT and merge, rebuilds SFT and eval
    sft_change = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, **{
        "cache.dir": cache, "sft.lora_alpha": 7})), tmp_path / "c")
    assert [sft_change[f"stage/{s}"] for s in ("cpt", "merge", "sft", "eval")] == ["reused", "reused", "built",
                                                                                  "built"]
    # a CPT change (or a new seed) invalidates the whole chain
    for override in ({"cpt.lora_alpha": 7}, {"seed": 1}):
        m = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, **{"cache.dir": cache, **override})),
                         tmp_path / f"d{len(override)}{list(override)[0]}")
        assert all(m[f"stage/{s}"] == "built" for s in ("cpt", "merge", "sft", "eval"))


def test_key_is_stable_and_sensitive():
    material = {"cpt": {"lora_alpha": 32, "r": 16}, "seed": 42}
    assert stage_key("cpt", material) == stage_key("cpt", {"seed": 42, "cpt": {"r": 16, "lora_alpha": 32}})
    assert stage_key("cpt", material) != stage_key("cpt", {**material, "seed": 43})
    assert stage_key("cpt", material) != stage_key("sft", material)


def _racer(root, log_path, barrier):
    def build(out):
        with atomic_output(out) as tmp:
            with open(log_path, "a") as f:
                f.write(f"built by {os.getpid()}\n")
            time.sleep(0.5)  # a slow build: the others must wait for it, not build again
            (tmp / "result.txt").write_text("done")

    barrier.wait(timeout=120)  # every process is imported and ready: they reach the cache at the same moment
    path, reused = StageCache(root).get_or_build("cpt", "k" * 16, build)
    assert (path / "result.txt").read_text() == "done"
    with open(log_path, "a") as f:
        f.write(f"{'reused' if reused else 'returned its build'}\n")


def test_racing_processes_build_once(tmp_path):
    """Four processes released together onto one missing key: one builds, three wait on the lock and reuse it."""
    ctx = mp.get_context("fork")  # nothing to import again: the four start at once (the builds use no torch)
    barrier, log_path = ctx.Barrier(4), tmp_path / "builds.log"
    procs = [ctx.Process(target=_racer, args=(tmp_path / "cache", log_path, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    lines = log_path.read_text().splitlines()
    assert sum(line.startswith("built by") for line in lines) == 1, lines
    assert sorted(line for line in lines if not line.startswith("built by")) == ["returned its build"] + ["reused"] * 3


def test_killed_build_resumes_and_prune_cleans_leftovers(tiny_model, data_files, tmp_path):
    from test_cli import run_cli
    from test_crash import KILL

    cache = tmp_path / "cache"
    # a checkpoint every 5 steps; SIGKILL (no cleanup runs) the moment the second one starts being written, so the
    # first is complete and the second half-written, whatever the machine's speed
    slow = {"cache.dir": cache, "cpt.max_steps": 12, "cpt.gradient_accumulation_steps": 1, "cpt.save_steps": 5,
            "stages": "[cpt]"}
    killed = run_cli(tiny_overrides(tiny_model, data_files, **slow, **{"hydra.run.dir": tmp_path / "killed"}),
                     prelude=KILL, env={"KILL_ON_WRITE": r"\.build/trainer/checkpoint-10/"})
    assert killed.returncode == -9, f"the kill point was never reached: {killed.stderr[-2000:]}"
    assert list((cache / "cpt").glob("*.build/trainer/checkpoint-5/trainer_state.json"))
    leftovers = list((cache / "cpt").glob("*.build"))
    assert len(leftovers) == 1 and not is_complete(leftovers[0])
    assert [r["state"] for r in list_entries(cache)] == ["building or interrupted (resumed by the next build)"]

    # the same key (save_steps only changes how it runs), run again: resumed from the last complete checkpoint, then
    # published; the build dir is gone
    again = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, **{**slow, "cpt.save_steps": 0})),
                         tmp_path / "again")
    assert again["stage/cpt"] == "built"
    stats = json.loads((tmp_path / "again" / "cpt_adapter" / "cpt_stats.json").read_text())
    assert stats["resumed_from_step"] == 5 and stats["steps"] == 12
    assert [r["state"] for r in list_entries(cache)] == ["complete"]

    # leftovers of killed builds (atomic `.tmp-*` and resumable `.build`) go with any prune
    (cache / "cpt" / f"{'b' * 16}.build" / "trainer" / "checkpoint-5").mkdir(parents=True)
    (cache / "cpt" / f"{'c' * 16}.tmp-1234abcd").mkdir()
    assert sorted(prune(cache)) == [f"cpt/{'b' * 16}.build (interrupted build)",
                                    f"cpt/{'c' * 16}.tmp-1234abcd (interrupted build)"]
    assert [r["stage"] for r in list_entries(cache)] == ["cpt"]


def _mk(out):
    with atomic_output(out) as tmp:
        (tmp / "x").write_text("1")


def test_cache_cli_list_and_prune(tmp_path, capsys):
    cache = StageCache(tmp_path / "c")
    for stage in ("cpt", "sft"):
        cache.get_or_build(stage, "a" * 16, _mk)
    assert cache_main(["--root", str(tmp_path / "c"), "list"]) == 0
    out = capsys.readouterr().out
    assert "cpt    aaaaaaaaaaaaaaaa" in out and "sft    aaaaaaaaaaaaaaaa" in out
    assert cache_main(["--root", str(tmp_path / "c"), "prune"]) == 2  # needs a filter
    assert cache_main(["--root", str(tmp_path / "c"), "prune", "--stage", "sft"]) == 0
    assert [r["stage"] for r in list_entries(tmp_path / "c")] == ["cpt"]
    assert cache_main(["--root", str(tmp_path / "c"), "prune", "--older-than", "1"]) == 0
    assert [r["stage"] for r in list_entries(tmp_path / "c")] == ["cpt"]  # used just now
    assert cache_main(["--root", str(tmp_path / "c"), "prune", "--all"]) == 0
    assert list_entries(tmp_path / "c") == []
