"""ViSurf's reward controls on the label: align it to the rollouts' style, and eliminate its thinking reward.

Pure Python: must not import torch, ray or transformers. Functions on strings and component dicts; none mutates
its arguments. (The third control, reward smoothing, acts on group rewards and lives in the objectives.)

Aligning (our reading of the paper's "rewrite the label in the style of the policy's outputs"):
- `detect_style` votes over the parsable rollouts (answer block present and parsed by the task's rules), field by
  field: the whitespace after `,` and after `:` in the JSON (a rollout votes only if it uses one spaces-only run for
  each), the key order of its first object, the number of decimals of its numbers (a rollout votes only if all its
  numbers agree; integers count as 0 decimals; exponents do not vote), whether a plain answer is wrapped (the task's
  ANSWER_WRAPPER, e.g. `\\boxed{…}`),
  and the whitespace between `</think>` and `<answer>` (rollouts that have that sequence). The most common value
  wins, ties go to the value seen first; a field nobody votes on keeps the canonical style (`json.dumps` spacing
  `", "` / `": "`, the task's key order, numbers as written in the solution, unwrapped plain answers, no separator).
- `serialize_answer` rewrites the solution in that style without changing any value: a number is written with the
  detected decimals only when that text parses back to the same value, else as in the solution.
- `label_completion(..., align=True)` is `<think></think>{separator}<answer>{aligned solution}</answer>`: the label
  has no reasoning, but its template matches the rollouts'. With align=False it is the raw label
  `<answer>{solution}</answer>`, the dataset's solution verbatim with no think block. Given a `reasoning` trace (not
  the paper's setting; `ObjectiveConfig.label_reasoning`), the think block holds it in both forms.
Eliminating the thinking reward: `eliminate_thinking_reward` sets the label's `thinking_format` to 0 and recomputes
`overall` as the sum of the other components; the label's reasoning is learnt only from the rollouts.
"""

import json
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from visurf_ray.rewards import get_task
from visurf_ray.rewards.answer import ANSWER_OPEN, find_answer_span, is_finite_number, parse_json_answer
from visurf_ray.rewards.thinking_format import THINK_CLOSE
from visurf_ray.validation import check_int, check_type, require

_SEPARATOR_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|([,:])(\s*)', re.DOTALL)


@dataclass(frozen=True)
class AnswerStyle:
    """How the policy writes its answers.

    item_separator: `,` plus spaces between array items and object members. key_separator: `:` plus spaces after a
    key. key_order: keys written first, in this order (others follow in the solution's order). decimals: digits after
    the decimal point of every number, or None to keep the solution's numbers. think_answer_separator: whitespace
    between `</think>` and `<answer>`. wrapped: whether a plain (non-JSON) answer is written inside its task's
    ANSWER_WRAPPER (e.g. `\\boxed{…}`).
    """

    item_separator: str = ", "
    key_separator: str = ": "
    key_order: tuple[str, ...] = ()
    decimals: int | None = None
    think_answer_separator: str = ""
    wrapped: bool = False

    def __post_init__(self) -> None:
        require(
            re.fullmatch(r",[ ]*", self.item_separator),
            "item_separator",
            f"must be ',' followed by spaces, got {self.item_separator!r}",
        )
        require(
            re.fullmatch(r":[ ]*", self.key_separator),
            "key_separator",
            f"must be ':' followed by spaces, got {self.key_separator!r}",
        )
        if self.decimals is not None:
            check_int("decimals", self.decimals, low=0, note="(or None)")
        require(
            not self.think_answer_separator.strip(),
            "think_answer_separator",
            f"must be whitespace, got {self.think_answer_separator!r}",
        )


def canonical_style(task: str) -> AnswerStyle:
    """The fallback style of `task`: json.dumps spacing, the task's canonical key order, the solution's numbers."""
    return AnswerStyle(key_order=tuple(get_task(task).CANONICAL_KEY_ORDER))


def _majority(votes: Iterable[Hashable], default: Any) -> Any:
    ranked = Counter(votes).most_common(1)
    return ranked[0][0] if ranked else default


def _single_spaces_run(runs: set[str], mark: str) -> str | None:
    if len(runs) != 1:
        return None
    run = next(iter(runs))
    return mark + run if run.strip(" ") == "" else None


def _json_votes(answer_text: str, answer: list | dict) -> dict[str, Hashable | None]:
    """One rollout's votes for the JSON fields (None = abstains)."""
    runs: dict[str, set[str]] = {",": set(), ":": set()}
    for match in _SEPARATOR_OR_STRING.finditer(answer_text):
        if match.group(1):
            runs[match.group(1)].add(match.group(2))
    decimals: set[int | None] = set()

    def record_float(text: str) -> float:
        decimals.add(None if "e" in text.lower() else len(text.partition(".")[2]))
        return float(text)

    def record_int(text: str) -> int:
        decimals.add(0)
        return int(text)

    json.loads(answer_text, parse_float=record_float, parse_int=record_int)
    first_object = answer if isinstance(answer, dict) else next((v for v in answer if isinstance(v, dict)), None)
    return {
        "item_separator": _single_spaces_run(runs[","], ","),
        "key_separator": _single_spaces_run(runs[":"], ":"),
        "key_order": tuple(first_object) if first_object else None,
        "decimals": next(iter(decimals)) if len(decimals) == 1 else None,
    }


def detect_style(task: str, completions: Sequence[str]) -> AnswerStyle:
    """The dominant answer style of a group of rollouts (any strings) of `task`, field by field (module docstring).

    completions: G rollouts. Returns the canonical style for fields no parsable rollout votes on.
    """
    definition = get_task(task)
    canonical = canonical_style(task)
    votes: dict[str, list[Hashable]] = {style_field.name: [] for style_field in fields(AnswerStyle)}
    for index, completion in enumerate(completions):
        check_type(f"completions[{index}]", completion, str, "a str")
        span = find_answer_span(completion)
        if span is None:
            continue
        answer_text = completion[span[0] : span[1]].strip()
        if definition.ANSWER_IS_JSON:
            answer = parse_json_answer(answer_text)
            if answer is None:
                continue
            for name, vote in _json_votes(answer_text, answer).items():
                if vote is not None:
                    votes[name].append(vote)
        else:
            if definition.parse_prediction(completion) is None:
                continue
            wrapper = definition.ANSWER_WRAPPER
            votes["wrapped"].append(wrapper is not None and wrapper[0] in answer_text)
        before_answer = completion[: span[0] - len(ANSWER_OPEN)]
        if before_answer.rstrip().endswith(THINK_CLOSE):
            votes["think_answer_separator"].append(before_answer[len(before_answer.rstrip()) :])
    return AnswerStyle(**{name: _majority(votes[name], getattr(canonical, name)) for name in votes})


def _format_number(value: int | float, decimals: int | None) -> str:
    if decimals is not None:
        text = f"{value:.{decimals}f}"
        if float(text) == value:
            return text
    return json.dumps(value)


def _dump(value: Any, style: AnswerStyle) -> str:
    if isinstance(value, dict):
        keys = [key for key in style.key_order if key in value] + [key for key in value if key not in style.key_order]
        members = (json.dumps(key, ensure_ascii=False) + style.key_separator + _dump(value[key], style) for key in keys)
        return "{" + style.item_separator.join(members) + "}"
    if isinstance(value, list):
        return "[" + style.item_separator.join(_dump(item, style) for item in value) + "]"
    if is_finite_number(value):
        return _format_number(value, style.decimals)
    return json.dumps(value, ensure_ascii=False)


def serialize_answer(task: str, solution: str, style: AnswerStyle) -> str:
    """The answer text of `solution` written in `style`, every value unchanged; ValueError for a bad solution."""
    definition = get_task(task)
    parsed = definition.parse_solution(solution)
    if definition.ANSWER_IS_JSON:
        return _dump(parse_json_answer(solution), style)
    if style.wrapped and definition.ANSWER_WRAPPER is not None:
        opening, closing = definition.ANSWER_WRAPPER
        return f"{opening}{parsed}{closing}"
    return parsed


def label_completion(
    task: str, solution: str, rollouts: Sequence[str], *, align: bool, reasoning: str | None = None
) -> str:
    """The label as a completion string: aligned to the rollouts' style, or the raw solution (module docstring).

    rollouts: the G completions of the same prompt (used only with align=True).
    reasoning: a reasoning trace to put in the label's think block (ViSurf's labels have none: None). With
        align=False it adds `<think>{reasoning}</think>` before the raw answer.
    """
    check_type("reasoning", reasoning, (str, type(None)), "a str or None")
    think = "" if reasoning is None else f"<think>{reasoning}</think>"
    if not align:
        get_task(task).parse_solution(solution)
        return f"{think}<answer>{solution}</answer>"
    style = detect_style(task, rollouts)
    think = think or "<think></think>"
    return f"{think}{style.think_answer_separator}<answer>{serialize_answer(task, solution, style)}</answer>"


def eliminate_thinking_reward(components: Mapping[str, float]) -> dict[str, float]:
    """A copy of the label's `components` with thinking_format 0 and overall = the sum of the other components.

    components: a verifier's output ({"thinking_format", ..., "overall"}); ValueError if either key is missing.
    """
    for name in ("thinking_format", "overall"):
        require(name in components, "components", f"has no {name!r} entry (keys: {sorted(components)})")
    eliminated = {name: float(value) for name, value in components.items() if name != "overall"}
    eliminated["thinking_format"] = 0.0
    eliminated["overall"] = sum(eliminated.values())
    return eliminated
