"""Metrics that are means of per-item values (`ItemMetric`), the building block every task's evaluation declares.

Pure numpy: must not import torch, ray or transformers.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SLICE_ALL = "all"
"""The slice of an item of a task without slices (gui_point, count)."""


def no_dataset_metrics(
    completions: Sequence[str], solutions: Sequence[str], image_sizes: Sequence[tuple[int, int]]
) -> dict[str, float]:
    """The `dataset_metrics` of a task whose every metric is an item mean: none."""
    return {}


@dataclass(frozen=True)
class ItemMetric:
    """A metric that is a mean of per-item values, so that it can be bootstrapped over items.

    value: the per-item value it averages (a task's `item_values`). parts: slice sets; the metric is the mean over
    parts of the mean of `value` over the items whose slice is in the part (None: every item). One part is a (slice)
    mean; the two parts (clean,), (defect,) make balanced accuracy. Items whose value is NaN (not measured) are left
    out; NaN when a part has no items left.
    """

    value: str
    parts: tuple[tuple[str, ...] | None, ...] = (None,)

    def compute(self, values: Sequence[float], slices: Sequence[str]) -> float:
        """The metric of N items: values and slices are [N]."""
        value_array, slice_array = np.asarray(values, dtype=np.float64), np.asarray(slices, dtype=object)
        measured = ~np.isnan(value_array)
        means = []
        for part in self.parts:
            chosen = measured if part is None else np.isin(slice_array, part) & measured
            if not chosen.any():
                return math.nan
            means.append(value_array[chosen].mean())
        return float(np.mean(means))
