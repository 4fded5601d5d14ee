"""Training: the step, the per-worker loop, the DeepSpeed engine, evaluation, checkpoints and the Ray Train launcher."""
