"""Pieces the stages and commands share: the typed config, data reading, scoring, prompts, model loading,
devices, stage outputs and the training loop's helpers."""
