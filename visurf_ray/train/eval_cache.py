"""The starting policy's evaluation, computed once per (checkpoint, eval items, decoding settings) and shared.

Every trial of a sweep starts from the same checkpoint and evaluates it on the same items with greedy decoding, so
step 0's evaluation is the same for all of them: the first trial computes it while holding a lock, the others read
it. The key covers everything that can change a greedy answer or its score: the checkpoint's files (names, sizes,
modification times), every eval item (id, task, prompt, solution, image bytes, the stored image's frame when resized),
the token limit, the eval batch size, torch's thread count, the dtype and the library versions. Never imports Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from visurf_ray.data.frames import IMAGE_FRAME
from visurf_ray.data.sample import Sample
from visurf_ray.locks import exclusive_lock
from visurf_ray.train import evaluate as evaluation
from visurf_ray.train.pretrain import default_cache_root

CACHE_VERSION = 3
"""Part of the key: bump it when evaluation code changes what a given policy and item set produce."""


def evaluation_key(checkpoint: Path, eval_sets: dict[str, list[Sample]], max_new_tokens: int, dtype: str) -> str:
    """24 hex digits identifying a starting evaluation (module docstring)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(checkpoint).rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(checkpoint)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    for name, samples in eval_sets.items():
        for s in samples:
            digest.update(f"{name}|{s.id}|{s.task}|{s.problem}|{s.solution}|{s.image.size}\n".encode())
            if IMAGE_FRAME in s.meta:  # a resized image: its answers are scored in the stored image's frame
                digest.update(json.dumps(s.meta[IMAGE_FRAME], sort_keys=True).encode())
            digest.update(s.image.tobytes())
    settings = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "max_new_tokens": max_new_tokens,
        "eval_batch": evaluation.EVAL_BATCH,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "version": CACHE_VERSION,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def cached_evaluation(key: str, compute: Callable[[], evaluation.Evaluation], cache_root: Path | None = None):
    """The evaluation stored under `key` in `<cache root>/evaluations/`, else `compute()`'s, stored there atomically
    (callers with the same key wait for the first one's result instead of computing it again)."""
    folder = Path(cache_root or default_cache_root()) / "evaluations"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    with exclusive_lock(folder / f"{key}.lock"):
        if path.is_file():
            stored = json.loads(path.read_text())
            return evaluation.Evaluation(stored["metrics"], stored["items"])
        result = compute()
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{key}.")
        with os.fdopen(handle, "w") as out:
            json.dump({"metrics": result.metrics, "items": result.items}, out)
        os.replace(temporary, path)
        return result
