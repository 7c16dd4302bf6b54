"""CPT → merge → SFT → eval: inject domain knowledge into a local LLM and measure how much of it survives SFT.

Importing the package makes the process offline before any Hugging Face library is imported: the hub, datasets and
transformers refuse network access, and telemetry is off (TRL's trainer sends a HEAD request at construction
otherwise, and unsloth downloads statistics at model load).
"""

import os

_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    # backend=unsloth runs only on CUDA; if unsloth ever gets imported on a CPU it must fail, not quietly fall back.
    "UNSLOTH_DISABLE_CPU_FALLBACK": "1",
    "WANDB_DISABLED": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 reports usage to its own server unless told (tracking=mlflow)
    # tokenizers warns (and may deadlock) when the Trainer forks dataloader workers after tokenizing.
    "TOKENIZERS_PARALLELISM": "false",
}
# Forced, not setdefault: a user's shell with HF_HUB_OFFLINE=0 must not make the pipeline go online.
os.environ.update(_OFFLINE)

__version__ = "0.1.0"
