"""Rollout backends: sample G completions per prompt with token ids (and old log-probs where the engine differs)."""
