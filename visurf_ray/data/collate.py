"""Seed-stable batching of Samples for training loops (the torch tensors are built in `visurf_ray.models.inputs`).

Imports numpy only: never torch, ray or transformers.
"""

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from visurf_ray.data.sample import Sample


def epoch_batches(
    samples: Sequence[Sample], batch_size: int, *, seed: int, drop_last: bool = True
) -> Iterator[list[Sample]]:
    """Endless batches of `batch_size` samples: epoch e visits `samples` in the order of
    `numpy.random.default_rng([seed, e]).permutation`, so a run resumed at any batch sees the same sequence.

    drop_last: leave out each epoch's last partial batch (every batch then has exactly `batch_size` samples);
    otherwise it is yielded short. ValueError for an empty `samples`, a batch_size < 1, or (with drop_last) fewer
    samples than one batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not samples or (drop_last and len(samples) < batch_size):
        raise ValueError(f"samples has {len(samples)} items, fewer than one batch of batch_size={batch_size}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for epoch in itertools.count():
        order = np.random.default_rng([seed, epoch]).permutation(len(samples))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            yield [samples[i] for i in order[start : start + batch_size]]
