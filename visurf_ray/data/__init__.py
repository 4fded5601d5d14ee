"""Data: prompts, the offline synthetic benchmark, loaders for real data.

Imports numpy, PIL and (for parquet, lazily) pyarrow: never torch, ray or transformers.
"""

from visurf_ray.data.benchmark import iter_split, make_split, split_names, target_text, text_corpus
from visurf_ray.data.loaders import DataError, LoadResult, load_grefcoco_eval, load_visurf_rows
from visurf_ray.data.prompts import format_problem
from visurf_ray.data.sample import Sample

__all__ = [
    "DataError",
    "LoadResult",
    "Sample",
    "format_problem",
    "iter_split",
    "load_grefcoco_eval",
    "load_visurf_rows",
    "make_split",
    "split_names",
    "target_text",
    "text_corpus",
]
