"""Validation helpers for the package's edges: config trees, data loaders and the public entry functions.

Every check names what it checks (`where`: a dotted config field, an argument name, `completions[3]`, ...) and raises
`ValidationError` (a ValueError) — or the `error` class a caller passes, such as config.ConfigError — with a message
of one form: "{where} must be {expected}, got {value}". Validate once where values enter (a config's __post_init__, a
loader's row, a public function's arguments); code below an entry trusts what it is given.

Pure Python: must not import ray or transformers (objectives/ and rewards/ import it), and imports torch only inside
`check_tensor` (torch-free modules — rewards, data loaders — import this one too). Tensor checks look at type, dtype
and shape only (free: no device work); `check_tensor(..., finite=True)` reads the values and is meant for CPU tensors
(rewards), never for device tensors in the per-step path.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ValidationError(ValueError):
    """A value is of the wrong type, shape or range; the message names the field, argument or record."""


def require(condition: object, where: str, message: str, *, error: type[ValueError] = ValidationError) -> None:
    """Raise `error(f"{where} {message}")` unless `condition` is true (a Python value: never pass a device tensor)."""
    if not condition:
        raise error(f"{where} {message}")


def check_choice(
    where: str, value: object, options: Collection[Any], *, error: type[ValueError] = ValidationError
) -> None:
    """`value` must be one of `options` (listed in their given order in the message)."""
    try:
        ok = value in options
    except TypeError:  # an unhashable value against a dict or set of names
        ok = False
    if not ok:
        raise error(f"{where} must be one of {list(options)!r}, got {value!r}")


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _describe_range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """The interval between `low` and `high` in words: "in [0, 1)", ">= 2", "> 0", "<= 5" or "" (no bound)."""
    if math.isinf(low) and math.isinf(high):
        return ""
    if math.isinf(high):
        return f"{'>' if low_open else '>='} {_bound(low)}"
    if math.isinf(low):
        return f"{'<' if high_open else '<='} {_bound(high)}"
    return f"in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"


def check_number(
    where: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    integer: bool = False,
    note: str = "",
    error: type[ValueError] = ValidationError,
) -> None:
    """`value` must be an int or float (never a bool; an int when `integer`), finite when `finite`, and within
    [low, high] (open ends with `low_open` / `high_open`); NaN always fails. `note` follows the expected range in the
    message (e.g. "(pixels)")."""
    kinds = int if integer else (int, float)
    ok = (
        not isinstance(value, bool)
        and isinstance(value, kinds)
        and (not finite or math.isfinite(value))
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        kind = "an int" if integer else "a finite number" if finite else "a number"
        expected = " ".join(part for part in (kind, _describe_range(low, high, low_open, high_open), note) if part)
        raise error(f"{where} must be {expected}, got {value!r}")


def check_int(
    where: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    high_open: bool = False,
    note: str = "",
    error: type[ValueError] = ValidationError,
) -> None:
    """`value` must be an int (not a bool) in [low, high] (or [low, high) with `high_open`)."""
    check_number(where, value, low=low, high=high, high_open=high_open, integer=True, note=note, error=error)


def check_bool(where: str, value: object, *, error: type[ValueError] = ValidationError) -> None:
    """`value` must be a bool (not 0/1, not "true")."""
    if not isinstance(value, bool):
        raise error(f"{where} must be a bool, got {value!r}")


def check_type(
    where: str, value: object, kinds: type | tuple[type, ...], what: str, *, error: type[ValueError] = ValidationError
) -> None:
    """`value` must be an instance of `kinds`, described as `what` in the message ("a str", "a PIL.Image.Image")."""
    if not isinstance(value, kinds):
        raise error(f"{where} must be {what}, got {type(value).__name__}")


def check_tensor(
    where: str,
    value: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    floating: bool = False,
    dims: str = "",
    nonempty: str = "",
    finite: bool = False,
    error: type[ValueError] = ValidationError,
) -> None:
    """`value` must be a torch.Tensor with the given dtype (or any floating dtype with `floating`), number of
    dimensions (`dims` names them in the message, e.g. "[N, T]"), exact shape, at least one entry along dim 0 when
    `nonempty` names what that dim holds ("group", "sequence"), and only finite values with `finite` (reads the values:
    CPU tensors only). Checked in that order; the message names the first requirement that fails."""
    import torch  # here, not at the top: torch-free modules import this one

    kind = str(dtype) if dtype is not None else "floating-point" if floating else ""
    if not isinstance(value, torch.Tensor):
        raise error(
            f"{where} must be a {kind or 'torch.Tensor'}{' tensor' if kind else ''}, got {type(value).__name__}"
        )
    if dtype is not None and value.dtype != dtype:
        raise error(f"{where} must be a {dtype} tensor, got {value.dtype}")
    if floating and not value.is_floating_point():
        raise error(f"{where} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        named = f" {dims}" if dims else ""
        raise error(f"{where} must have {ndim} dimension(s){named}, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise error(f"{where} must be a tensor of shape {tuple(shape)}, got shape {tuple(value.shape)}")
    if nonempty and (value.ndim == 0 or value.shape[0] < 1):
        raise error(f"{where} must hold at least one {nonempty}, got shape {tuple(value.shape)}")
    if finite and not bool(torch.isfinite(value).all()):
        raise error(f"{where} must be finite (no NaN or inf)")
