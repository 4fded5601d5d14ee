"""Seed-stable batching: each epoch is a permutation, the same seed gives the same batches, bad arguments fail."""

import itertools

import pytest

from visurf_ray.data.benchmark import make_split
from visurf_ray.data.collate import epoch_batches


@pytest.fixture(scope="module")
def samples():
    return make_split("pretrain", 10, seed=0)


def ids(batches) -> list[list[str]]:
    return [[s.id for s in batch] for batch in batches]


def test_each_epoch_visits_every_sample_once(samples):
    batches = ids(itertools.islice(epoch_batches(samples, 4, seed=1, drop_last=False), 6))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(i for b in epoch for i in b) == sorted(s.id for s in samples)
    assert batches[:3] != batches[3:]


def test_drop_last_gives_full_batches_and_same_seed_same_sequence(samples):
    first = ids(itertools.islice(epoch_batches(samples, 3, seed=5), 9))
    assert all(len(b) == 3 for b in first)
    assert first == ids(itertools.islice(epoch_batches(samples, 3, seed=5), 9))
    assert first != ids(itertools.islice(epoch_batches(samples, 3, seed=6), 9))


def test_bad_arguments_raise(samples):
    for kwargs, message in [
        ({"batch_size": 0, "seed": 0}, "batch_size"),
        ({"batch_size": 11, "seed": 0}, "fewer than one batch"),
        ({"batch_size": 2, "seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=message):
            next(epoch_batches(samples, **kwargs))
    with pytest.raises(ValueError, match="0 items"):
        next(epoch_batches([], 1, seed=0, drop_last=False))
