"""The trainer's seed-stable batches (`visurf_ray.train.loop.batch_for_step`): the prompt stream is a sequence of epoch
permutations, the same seed gives the same batches, and the ranks' shards make up the global batch."""

import pytest

from visurf_ray.data.benchmark import make_split
from visurf_ray.train.loop import batch_for_step


@pytest.fixture(scope="module")
def dataset():
    return make_split("pretrain", 10, seed=0)


def ids(batch) -> list[str]:
    return [sample.id for sample in batch]


def stream(dataset, steps: int, per_step: int, seed: int) -> list[str]:
    return [i for step in range(steps) for i in ids(batch_for_step(dataset, step, per_step, 0, 1, seed))]


def test_each_epoch_visits_every_sample_once_across_batch_boundaries(dataset):
    visited = stream(dataset, steps=5, per_step=4, seed=1)  # 20 prompts: two epochs, a batch straddles each boundary
    epochs = [visited[:10], visited[10:]]
    assert all(sorted(epoch) == sorted(ids(dataset)) for epoch in epochs)
    assert epochs[0] != epochs[1]


def test_same_seed_gives_the_same_batches(dataset):
    first = stream(dataset, steps=6, per_step=3, seed=5)
    assert first == stream(dataset, steps=6, per_step=3, seed=5)
    assert first != stream(dataset, steps=6, per_step=3, seed=6)


def test_ranks_split_the_global_batch_into_contiguous_shards(dataset):
    for step in range(4):
        whole = ids(batch_for_step(dataset, step, 4, 0, 1, seed=2))
        shards = [ids(batch_for_step(dataset, step, 4, rank, 2, seed=2)) for rank in range(2)]
        assert shards[0] + shards[1] == whole
    with pytest.raises(ValueError, match="prompts_per_step=3 must be divisible by ray.num_workers=2"):
        batch_for_step(dataset, 0, 3, 0, 2, seed=0)
