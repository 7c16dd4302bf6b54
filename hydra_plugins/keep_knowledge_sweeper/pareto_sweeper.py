"""Registers `hydra/sweeper=pareto`: the pipeline's Pareto search (pipeline/sweep/search.py) as a Hydra sweeper.

Hydra imports every module of the `hydra_plugins` namespace package at start-up, so this module stays light: the
settings below and nothing else; the search and Optuna are imported only when a search runs.

    python -m pipeline.run -m hydra/sweeper=pareto hydra.sweep.dir=outputs/searches/mine \
        'sft.learning_rate=tag(log, interval(1e-4, 1e-3))' 'sft.kl_weight=tag(log, interval(0.01, 10))'
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


@dataclass
class ParetoSweeperConf:
    _target_: str = "hydra_plugins.keep_knowledge_sweeper.pareto_sweeper.ParetoSweeper"
    # The search space, in the optuna sweeper's syntax: choice(8, 32, 128) or 8,32,128; range(1, 5);
    # interval(1e-5, 1e-3); int(interval(4, 64)); tag(log, interval(...)). A plain value is passed to every trial.
    params: Optional[Dict[str, Any]] = None
    # "METRIC maximize" or "METRIC minimize", METRIC a key of metrics.json. Empty: sft/<eval.headline_metric> and
    # sft/general_<headline> (or sft/heldout_ppl, minimized, when there is no general QA set), both of the SFT model.
    objectives: List[str] = field(default_factory=list)
    # "METRIC >= NUMBER" or "METRIC <= NUMBER", e.g. "sft/format_rate >= 0.9": trials that miss one are never on
    # the front, and the sampler learns to avoid them.
    constraints: List[str] = field(default_factory=list)
    trials: int = 8               # the study's size: a rerun of the command continues until this many are done
    trials_per_round: int = 1     # asked together and launched as one batch (hydra/launcher=parallel runs them at once)
    group_by_cpt: bool = True     # a round's trials share the first one's CPT settings: one CPT model per round
    sampler: str = "tpe"          # tpe (multi-objective TPE), nsga2, random
    seed: int = 0                 # the sampler's seed
    startup_trials: int = 4       # tpe: random trials before the model of good settings takes over
    study_name: str = "search"
    storage: Optional[str] = None  # null: sqlite:///<hydra.sweep.dir>/study.db
    confirm_seeds: List[int] = field(default_factory=list)  # e.g. [1, 2, 3]: rerun the front over sft.seed


class ParetoSweeper(Sweeper):
    """Hydra instantiates sweepers from this package only; the search itself is pipeline.sweep.search."""

    def __init__(self, **settings: Any) -> None:
        from pipeline.sweep.search import ParetoSearch

        self.search = ParetoSearch(**settings)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.search.sweep(arguments)


ConfigStore.instance().store(group="hydra/sweeper", name="pareto", node=ParetoSweeperConf,
                             provider="keep-knowledge")
