"""A Pareto search over the chained stages: a Hydra sweeper that drives Optuna's ask-and-tell API.

    python -m pipeline.run -m +experiment=lever_search          # the levers' strengths (conf/experiment/)
    python -m pipeline.run -m +experiment=seed_grid_search      # the seed grid's question, as a search
    python -m pipeline.run -m hydra/sweeper=pareto hydra.sweep.dir=outputs/searches/mine \
        'sft.learning_rate=tag(log, interval(1e-4, 1e-3))' 'sft.lora_alpha=choice(8, 32)'

`hydra/sweeper=pareto` is registered by hydra_plugins/keep_knowledge_sweeper (Hydra finds plugins in that namespace
package); its settings are ParetoSweeperConf there. Why a sweeper of our own: hydra-optuna-sweeper's release pins
optuna<3, and its Optuna-4 code needs Hydra 1.4 pre-releases.

How a search runs:
- The search space is `hydra.sweeper.params` plus sweep overrides on the command line, in the optuna sweeper's
  syntax (parse_space). Values that are not sweeps are passed to every trial unchanged.
- Each round asks `trials_per_round` trials, launches them with the configured launcher (the same job function as
  any `-m` run, so each trial is a job directory with its metrics.json) and tells Optuna each trial's objectives, read
  from metrics.json. A job that failed (error.txt) or lacks an objective is told as failed; the search goes on.
- CPT is the expensive stage. With `group_by_cpt` the trials of a round after the first take the first trial's CPT
  settings (enqueued as fixed parameters; the sampler draws the rest), so a round trains at most one CPT model and
  the stage cache serves it to the others. CPT settings written as choice(...) let later rounds return to a CPT model
  already built.
- The study is an SQLite file in the search directory (`study.db`). Run the same command again (same
  hydra.sweep.dir) and it continues: a trial that was running when the search was killed is marked failed
  (`interrupted`) and asked again with the same settings into the same job directory, where the stage cache and the
  stages' checkpoints resume its work.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pipeline.core.outputs import PipelineError
from pipeline.core.progress import CONSOLE
from pipeline.sweep import pareto

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "nsga2", "random")
# Keys whose value cannot change the CPT model: everything else (cpt.*, model.*, seed, data.cpt*, config groups such
# as `lever` that may set any of those) is treated as a CPT setting when trials are grouped by CPT.
AFTER_CPT = ("sft.", "eval.", "merge.", "chat_vector.", "data.sft.", "data.qa.", "data.general_qa.", "data.heldout.",
             "data.replay.", "data.dev_qa.", "tracking.", "inputs.", "stages", "debug", "log_examples", "device")


@dataclass
class Space:
    """The search space: Optuna distributions per override key, and the overrides every trial gets unchanged."""
    dims: Dict[str, Any] = field(default_factory=dict)
    fixed: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> Dict[str, str]:
        return {**{k: repr(d) for k, d in self.dims.items()}, **{k: f"fixed {v}" for k, v in self.fixed.items()}}


def is_cpt_key(key: str) -> bool:
    key = key.lstrip("+~")
    return not key.startswith(AFTER_CPT)


def _distribution(override, where: str):
    """One Hydra sweep override → an Optuna distribution, the way hydra-optuna-sweeper reads them:
    choice(a, b) and a,b → categorical; range(a, b[, step]) → integers a ≤ x < b (floats: categorical);
    interval(a, b) → uniform float; int(interval(a, b)) → uniform integer; tag(log, ...) → log-uniform."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and (value.shuffle or any(
            isinstance(v, float) for v in (value.start, value.stop, value.step)))):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if len(set(map(repr, choices))) < len(choices):
            raise PipelineError(f"{where}: a choice lists the same value twice")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():
        if value.stop - value.start <= 0 or value.step <= 0:
            raise PipelineError(f"{where}: range({value.start}, {value.stop}, {value.step}) is empty")
        last = value.start + (value.stop - value.start - 1) // value.step * value.step  # range() excludes stop
        return IntDistribution(int(value.start), int(last), step=int(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        unknown = set(value.tags) - {"log"}
        if unknown:
            raise PipelineError(f"{where}: unknown tag(s) {sorted(unknown)}; the only tag read is log")
        if not value.start < value.end:
            raise PipelineError(f"{where}: interval({value.start}, {value.end}) needs start < end")
        if log_scale and value.start <= 0:
            raise PipelineError(f"{where}: a log interval needs a positive start (got {value.start})")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise PipelineError(f"{where}: unsupported sweep {override.input_line!r}; use choice(...), a,b,c, range(...), "
                        f"interval(...), int(interval(...)) or tag(log, ...)")


def parse_space(params: Optional[Mapping[str, Any]], arguments: Sequence[str] = ()) -> Space:
    """`hydra.sweeper.params` ({key: "interval(1e-5, 1e-3)", ...}) and the command line's overrides → Space.

    A sweep expression becomes a dimension; any other value is passed to every trial as it is (the command line's
    `cpt.max_steps=10`, or a fixed value in params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    space = Space()
    lines = [(f"hydra.sweeper.params.{k}", f"{k}={v}") for k, v in (params or {}).items()]
    lines += [(f"command-line override {a!r}", a) for a in arguments]
    for where, line in lines:
        try:
            override = parser.parse_override(line)
        except HydraException as e:
            raise PipelineError(f"{where}: {str(e).splitlines()[0]}") from None
        key = override.get_key_element()
        space.dims.pop(key, None)
        space.fixed.pop(key, None)  # the command line wins over params, as in Hydra's own sweeper
        if override.is_sweep_override():
            space.dims[key] = _distribution(override, where)
        else:
            space.fixed[key] = override.get_value_element_as_str()
    return space


def override_value(v: Any) -> str:
    """A sampled value as Hydra override text (Optuna keeps choices as the encoded strings they came from)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def parse_objectives(objectives: Sequence[str]) -> List[pareto.Objective]:
    """["sft/contains maximize", "sft/heldout_ppl minimize"] → [(metric, direction), ...]."""
    out = []
    for text in objectives:
        parts = str(text).split()
        if len(parts) != 2 or parts[1] not in DIRECTIONS:
            raise PipelineError(f"hydra.sweeper.objectives: {text!r}: write 'METRIC maximize' or 'METRIC minimize'")
        out.append((parts[0], parts[1]))
    if len({m for m, _ in out}) < len(out):
        raise PipelineError("hydra.sweeper.objectives: a metric is listed twice")
    return out


def parse_constraints(constraints: Sequence[str]) -> List[pareto.Constraint]:
    """["sft/format_rate >= 0.9"] → [("sft/format_rate", ">=", 0.9)]."""
    out = []
    for text in constraints:
        parts = str(text).split()
        try:
            threshold = float(parts[2]) if len(parts) == 3 else math.nan
        except ValueError:
            threshold = math.nan
        if len(parts) != 3 or parts[1] not in (">=", "<=") or math.isnan(threshold):
            raise PipelineError(f"hydra.sweeper.constraints: {text!r}: write 'METRIC >= NUMBER' or "
                                f"'METRIC <= NUMBER' (spaces around the operator)")
        out.append((parts[0], parts[1], threshold))
    return out


def default_objectives(cfg: DictConfig) -> List[pareto.Objective]:
    """The SFT model's score on the injected facts, and what it kept of the base model's general knowledge when
    there is a general QA set (else the held-out domain text's perplexity, lower is better, when there is one)."""
    headline = OmegaConf.select(cfg, "eval.headline_metric", default="contains")
    out = [(f"sft/{headline}", "maximize")]
    if OmegaConf.select(cfg, "data.general_qa.path", default=None):
        out.append((f"sft/general_{headline}", "maximize"))
    elif OmegaConf.select(cfg, "data.heldout.path", default=None):
        out.append(("sft/heldout_ppl", "minimize"))
    return out


def read_job(job_dir: Path, job_return=None) -> Tuple[Optional[dict], Optional[str]]:
    """(metrics.json, None) for a finished job, (None, the error) for a failed one."""
    if (job_dir / "metrics.json").is_file():
        return json.loads((job_dir / "metrics.json").read_text(encoding="utf-8")), None
    if (job_dir / "error.txt").is_file():
        return None, (job_dir / "error.txt").read_text(encoding="utf-8").strip()
    exc = getattr(job_return, "_return_value", None)
    if isinstance(exc, BaseException):
        return None, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return None, f"no metrics.json in {job_dir}"


def score(metrics: dict, objectives, constraints) -> Tuple[Optional[List[float]], Dict[str, float], Optional[str]]:
    """(objective values, constraint metrics, None) or (None, {}, why the job cannot be scored)."""
    def number(m):
        v = metrics.get(m)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None

    values = [number(m) for m, _ in objectives]
    cons = {m: number(m) for m, _, _ in constraints}
    missing = [m for m, v in [*zip([m for m, _ in objectives], values), *cons.items()] if v is None]
    if missing:
        return None, {}, (f"metrics.json has no value for {', '.join(missing)} (is the metric computed in this "
                          f"run? see README, 'The metrics')")
    return values, cons, None


class ParetoSearch(Sweeper):
    """hydra/sweeper=pareto (its settings: ParetoSweeperConf in hydra_plugins/keep_knowledge_sweeper)."""

    def __init__(self, params=None, objectives=None, constraints=None, trials: int = 8, trials_per_round: int = 1,
                 group_by_cpt: bool = True, sampler: str = "tpe", seed: int = 0, startup_trials: int = 4,
                 study_name: str = "search", storage: Optional[str] = None, confirm_seeds: Sequence[int] = ()):
        super().__init__()
        self.params = dict(params or {})
        self.objectives = list(objectives or [])
        self.constraints = list(constraints or [])
        self.trials, self.trials_per_round, self.group_by_cpt = int(trials), int(trials_per_round), group_by_cpt
        self.sampler_name, self.seed, self.startup_trials = str(sampler), int(seed), int(startup_trials)
        self.study_name, self.storage = str(study_name), storage
        self.confirm_seeds = [int(s) for s in (confirm_seeds or [])]
        self.config: Optional[DictConfig] = None
        self.hydra_context = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        try:
            return self.search(arguments)
        except PipelineError as e:  # bad search settings: one line, exit 2, before any trial trains
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    # ------------------------------------------------------------------------------------------------------ setup

    def _check(self, space: Space, objectives, constraints) -> None:
        for key, value, ok in (("trials", self.trials, self.trials >= 1),
                               ("trials_per_round", self.trials_per_round, self.trials_per_round >= 1),
                               ("startup_trials", self.startup_trials, self.startup_trials >= 0),
                               ("sampler", self.sampler_name, self.sampler_name in SAMPLERS)):
            if not ok:
                what = f"use one of {', '.join(SAMPLERS)}" if key == "sampler" else "must be at least " + (
                    "0" if key == "startup_trials" else "1")
                raise PipelineError(f"hydra.sweeper.{key}={value!r}: {what}")
        if not space.dims:
            raise PipelineError("hydra.sweeper.params: no dimension to search (write e.g. "
                                "sft.learning_rate: tag(log, interval(1e-4, 1e-3)))")
        subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir", "${hydra.job.num}") \
            if self.config is not None else "${hydra.job.num}"
        if subdir != "${hydra.job.num}":  # trials find their jobs (and a resumed search its reruns) by job number
            raise PipelineError(f"hydra.sweep.subdir={subdir}: a search needs the default ${{hydra.job.num}}")
        if self.confirm_seeds and "sft.seed" in {k.lstrip("+~") for k in [*space.dims, *space.fixed]}:
            raise PipelineError("hydra.sweeper.confirm_seeds reruns the front over sft.seed: sft.seed cannot also be "
                                "searched or fixed")
        if self.hydra_context is not None:  # every key must compose before anything trains (a typo fails here)
            from hydra.errors import HydraException

            probe = [f"{k}={override_value(_probe_value(d))}" for k, d in space.dims.items()]
            probe += [f"{k}={v}" for k, v in space.fixed.items()]
            try:
                self.validate_batch_is_legal([probe])
            except (HydraException, ValueError) as e:
                raise PipelineError(f"hydra.sweeper.params: {str(e).strip().splitlines()[0]}") from None

    def _study(self, sweep_dir: Path, space: Space, objectives, constraints):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        storage = self.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
        if storage.startswith(("http:", "https:")):
            raise PipelineError(f"hydra.sweeper.storage={storage}: the study lives in a local file (sqlite:///...)")
        signature = {"space": space.describe(), "objectives": objectives, "constraints": constraints}
        signature = json.loads(json.dumps(signature))  # tuples → lists, as the stored copy reads back
        study = optuna.create_study(storage=storage, study_name=self.study_name, load_if_exists=True,
                                    directions=[d for _, d in objectives])
        stored = study.user_attrs.get("signature")
        if stored is None:
            study.set_user_attr("signature", signature)
        elif stored != signature:
            changed = [k for k in signature if signature[k] != stored.get(k)]
            raise PipelineError(f"hydra.sweeper: the study {self.study_name!r} in {storage} was started with another "
                                f"{' and '.join(changed)}; continue it with the same settings, or start a new one "
                                f"(another hydra.sweep.dir or hydra.sweeper.study_name)")
        study.sampler = self._sampler(len(study.trials), len(constraints))
        return study

    def _sampler(self, n_existing: int, n_constraints: int):
        import optuna

        # A resumed search must not replay the random draws of its first run: the seed moves with the study's length.
        seed = self.seed + n_existing
        constraints_func = (lambda t: t.user_attrs["constraints"]) if n_constraints else None
        if self.sampler_name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.sampler_name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=max(2, self.trials_per_round), seed=seed,
                                                 constraints_func=constraints_func)
        return optuna.samplers.TPESampler(n_startup_trials=self.startup_trials, seed=seed,
                                          constraints_func=constraints_func)

    # ------------------------------------------------------------------------------------------------------ search

    def search(self, arguments: List[str]) -> List[dict]:
        import optuna
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        space = parse_space(self.params, arguments)
        objectives = parse_objectives(self.objectives) if self.objectives else default_objectives(self.config)
        constraints = parse_constraints(self.constraints)
        self._check(space, objectives, constraints)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = self._study(sweep_dir, space, objectives, constraints)

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # the search was killed mid-round
            trial, job = optuna.trial.Trial(study, t._trial_id), t.user_attrs.get("job")
            if job is not None and any((sweep_dir / job / f).is_file() for f in ("metrics.json", "error.txt")):
                self._tell(study, trial, sweep_dir / job, None, objectives, constraints)  # it finished before the kill
                continue
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"job": job, "rerun_of": t.number})
            log.info("search: trial %d was interrupted; asking it again (job %s)", t.number, job, extra=CONSOLE)

        log.info("search: study %s in %s; %d of %d trials done; objectives %s", self.study_name, sweep_dir,
                 self._done(study), self.trials, ", ".join(f"{d} {m}" for m, d in objectives), extra=CONSOLE)
        while self._done(study) < self.trials:
            n = min(self.trials_per_round, self.trials - self._done(study))
            trials = self._ask_round(study, space, n)
            self._run_round(study, trials, space, objectives, constraints, sweep_dir)

        records = self.write(study, objectives, constraints, sweep_dir)
        if self.confirm_seeds:
            self._confirm(study, records, space, objectives, sweep_dir)
            records = self.write(study, objectives, constraints, sweep_dir)
        return records

    @staticmethod
    def _done(study) -> int:
        from optuna.trial import TrialState

        return sum(t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get(
            "interrupted")) for t in study.get_trials(deepcopy=False))

    def _ask_round(self, study, space: Space, n: int) -> list:
        """n trials; with group_by_cpt, the round's later trials share the first one's CPT settings."""
        from optuna.trial import TrialState

        trials = [study.ask(space.dims)]
        shared = {k: v for k, v in trials[0].params.items() if is_cpt_key(k)} if self.group_by_cpt else {}
        for _ in range(n - 1):
            # trials already queued (reruns of interrupted ones) come first, with all their settings
            if shared and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                study.enqueue_trial(shared)
            trials.append(study.ask(space.dims))
        return trials

    def _next_job(self, sweep_dir: Path, study) -> int:
        used = [int(d.name) for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()]
        used += [int(t.user_attrs["job"]) for t in study.get_trials(deepcopy=False) if t.user_attrs.get("job")]
        return max(used, default=-1) + 1

    def _overrides(self, params: Mapping[str, Any], space: Space) -> List[str]:
        return [*(f"{k}={v}" for k, v in space.fixed.items()), *(f"{k}={override_value(v)}" for k, v in params.items())]

    def _launch(self, jobs: List[Tuple[int, List[str]]]) -> Dict[int, Any]:
        """Launch (job number, overrides) pairs, consecutive numbers together (a launcher numbers its batch from
        initial_job_idx); returns each job's JobReturn."""
        out: Dict[int, Any] = {}
        jobs = sorted(jobs)
        i = 0
        while i < len(jobs):
            j = i
            while j + 1 < len(jobs) and jobs[j + 1][0] == jobs[j][0] + 1:
                j += 1
            batch = jobs[i:j + 1]
            for (num, _), ret in zip(batch, self.launcher.launch([o for _, o in batch],
                                                                 initial_job_idx=batch[0][0])):
                out[num] = ret
            i = j + 1
        return out

    def _run_round(self, study, trials: list, space: Space, objectives, constraints, sweep_dir: Path) -> None:

        # new trials get the next job numbers, ordered by their CPT settings (a sequential launcher then trains each
        # CPT model before the trials that reuse it); a rerun goes back into its own job directory
        fresh = sorted([t for t in trials if t.user_attrs.get("job") is None],
                       key=lambda t: sorted((k, repr(v)) for k, v in t.params.items() if is_cpt_key(k)))
        start = self._next_job(sweep_dir, study)
        for i, t in enumerate(fresh):
            t.set_user_attr("job", str(start + i))
        jobs = {int(t.user_attrs["job"]): t for t in trials}
        for num, t in sorted(jobs.items()):
            log.info("search: trial %d (job %d): %s", t.number, num,
                     " ".join(f"{k}={override_value(v)}" for k, v in t.params.items()), extra=CONSOLE)
        returns = self._launch([(num, self._overrides(t.params, space)) for num, t in jobs.items()])
        for num, t in sorted(jobs.items()):
            self._tell(study, t, sweep_dir / str(num), returns.get(num), objectives, constraints)

    @staticmethod
    def _tell(study, trial, job_dir: Path, job_return, objectives, constraints) -> None:
        """Tell Optuna what the trial's job gave: its objectives (and constraint values), or that it failed."""
        from optuna.trial import TrialState

        metrics, error = read_job(job_dir, job_return)
        values, cons = None, {}
        if metrics is not None:
            values, cons, error = score(metrics, objectives, constraints)
        for k in ("stage/cpt", "stage/sft"):
            if metrics and metrics.get(k):
                trial.set_user_attr(k, metrics[k])
        if values is None:
            trial.set_user_attr("error", error)
            study.tell(trial, state=TrialState.FAIL)
            log.info("search: trial %d failed: %s", trial.number, error, extra=CONSOLE)
            return
        trial.set_user_attr("constraint_values", cons)
        if constraints:
            trial.set_user_attr("constraints", [pareto.violation(cons[m], op, th) for m, op, th in constraints])
        study.tell(trial, values)
        log.info("search: trial %d: %s", trial.number, ", ".join(
            f"{m} {v:.4g}" for (m, _), v in zip(objectives, values)), extra=CONSOLE)

    # ------------------------------------------------------------------------------------------------------ output

    def records(self, study, objectives, constraints) -> List[dict]:
        out = []
        for t in study.get_trials(deepcopy=False):
            if t.user_attrs.get("interrupted"):
                continue  # asked again as another trial
            values = dict(zip([m for m, _ in objectives], t.values)) if t.values else {}
            cons = t.user_attrs.get("constraint_values", {})
            feasible = all(pareto.violation(cons[m], op, th) <= 0 for m, op, th in constraints if m in cons)
            out.append({"trial": t.number, "job": t.user_attrs.get("job"), "state": t.state.name,
                        "params": {k: override_value(v) if isinstance(v, bool) else v for k, v in t.params.items()},
                        "values": values, "constraints": cons, "feasible": feasible,
                        "error": t.user_attrs.get("error"), "stage/cpt": t.user_attrs.get("stage/cpt"),
                        "stage/sft": t.user_attrs.get("stage/sft")})
        return out

    def write(self, study, objectives, constraints, sweep_dir: Path) -> List[dict]:
        from pipeline.aggregate import read_jobs

        records = self.records(study, objectives, constraints)
        confirmation = None
        runs = study.user_attrs.get("confirmation") or {}
        if runs and self.confirm_seeds:
            pareto.mark_front(records, objectives)
            metrics = {}
            for key, job in runs.items():
                trial, seed = map(int, key.split(":"))
                metrics[(trial, seed)], _ = read_job(sweep_dir / str(job))
            confirmation = pareto.confirmation_table([r for r in records if r["on_front"]], metrics, objectives,
                                                     self.confirm_seeds)
        path = pareto.write_outputs(sweep_dir, records, objectives, constraints, read_jobs(sweep_dir), confirmation)
        log.info("search: Pareto front in %s", path, extra=CONSOLE)
        return records

    def _confirm(self, study, records: List[dict], space: Space, objectives, sweep_dir: Path) -> None:
        """Rerun every front point over sft.seed=confirm_seeds (jobs after the trials'; recorded in the study, so a
        rerun of the command skips the finished ones)."""
        pareto.mark_front(records, objectives)
        runs = dict(study.user_attrs.get("confirmation") or {})
        jobs, start = [], self._next_job(sweep_dir, study)
        start = max([start, *(int(j) + 1 for j in runs.values())])
        for r in [r for r in records if r["on_front"]]:
            for seed in self.confirm_seeds:
                key = f"{r['trial']}:{seed}"
                if key in runs and (sweep_dir / str(runs[key]) / "metrics.json").is_file():
                    continue
                num = int(runs[key]) if key in runs else start + len(jobs)
                runs[key] = str(num)
                params = study.trials[r["trial"]].params
                jobs.append((num, [*self._overrides(params, space), f"sft.seed={seed}"]))
        study.set_user_attr("confirmation", runs)  # before launching: a killed confirmation reruns into its jobs
        if jobs:
            log.info("search: confirming %d front point(s) over sft.seed=%s (%d jobs)",
                     sum(r["on_front"] for r in records), ",".join(map(str, self.confirm_seeds)), len(jobs),
                     extra=CONSOLE)
            self._launch(jobs)


def _probe_value(dist):
    """A value inside a distribution, to check that a trial's overrides compose."""
    from optuna.distributions import CategoricalDistribution

    return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low
