"""Perception checks on a base model: can it *see* the concepts whose answers it was never taught?

ViSurf's central claim is about items beyond the base model's knowledge: the label teaches an answer (`[]` for a
no-object query, "no defect" for a clean texture) that rollouts never sample. The paper's base model perceives what
its answers lack (it sees that nothing matches; it lacks the habit of answering `[]`). A benchmark can test that
claim only if its base model does too, so each beyond-knowledge slice gets a check, made on the base model before
any post-training. Classes are balanced (chance 0.5); a concept counts as visible when its deciding check
(`DECIDING`) reaches PROBE_THRESHOLD:
- "no_object" (is the queried colour × shape in the image? single-object queries "Find the red circle." with the
  object present vs absent, pretraining colours only, so colour novelty cannot give it away):
  - "no_object_count_answer" (deciding): the base model's own greedy answer to "How many red circles are there?" on
    the same image — balanced accuracy of "0" against absence: asked in a form it was taught, does it see it?
  - "no_object_count_think" (diagnostic): the same, reading the count its think states ("I count 0 red circles.");
  - "no_object_prompt": a linear probe on the language model's last hidden state at the grounding prompt's last token
    (diagnostic: whether the grounding question itself already carries it).
  - "no_object_image_per_look" (diagnostic: does the vision tower carry the look at all?): for each pretraining
    colour × shape, a linear probe on the image tokens max-pooled over positions, present vs absent, on items that
    ask for that look; the mean over the looks. With the query fixed, this reads only what the image shows.
  - "query_binding" (diagnostic, the prerequisite of both): on two-object "Find the <colour> <shape>." items, of the
    greedy answers whose first box finds one of the two objects (IoU > 0.5), the share that finds the queried one.
    A model that localises objects without reading which one was asked scores chance, and then cannot tell whether
    the asked look is there either.
  - "query_binding_mixed" (diagnostic): on the same items, the share of all answers whose first box finds neither
    object but the phantom made of one object's columns and the other's rows: coordinates read from different objects.
  - "query_reading" (diagnostic, the language side): of the greedy answers to count questions that name a look ("How
    many red circles / red shapes / circles are there?", pretraining forms), the share whose think names the asked
    look ("I count 2 red circles."): whether the language model reads the question at all.
  - "query_selection_{asked,colours,answer}" (diagnostics: where selection by the question fails): on held-out
    "How many <colour> shapes are there?" items, linear probes on the language model's last hidden state where the
    count is written (after a forced "<think>I count "): which colour was asked (4 classes), whether each colour is
    in the image whatever was asked (the mean over the 4 colours), and whether the asked colour is — the bit the
    answer 0 needs; "query_selection_by_objects" is the last probe reading only the number of objects (one-hot),
    the accuracy that counting all shapes gives. A model that carries the question to that position while its
    answer probe stays at the by-objects figure reads the question and fails to select the image's objects by it.
- "empty_image" (is anything there? the simpler no-object slice, meant for a model of this size): each
  single-object item of "no_object" beside the same question on an empty image (`emptied`), matched pairs:
  - "empty_image_all_think" (deciding): asked "How many shapes are there?" on both images, the count the greedy
    answer's think states ("I count 0 shapes.") — balanced accuracy of 0 against the empty image. The think, not the
    boxed number, decides: the tiny base model's boxed count often disagrees with its own think (it boxes 0 after
    "I count 1 green shapes."), a failure to copy a digit, not to see;
  - "empty_image_all_answer" (diagnostic): the same, reading the boxed answer;
  - "empty_image_count_{think,answer}" (diagnostic; deciding until session 12): the same asking about the grounding
    query's look ("How many red circles are there?"). It needs the model to bind the asked look to the object —
    the ability the first slice's check finds missing — so it cannot isolate "is anything there?": a base model that
    counts the one object when asked "How many shapes?" (88 %) can still answer 0 to "How many red circles?" about
    that same object (97 %);
  - "empty_image_prompt" (diagnostic): a linear probe on the last hidden state of the grounding prompt.
- "anomaly" (is the texture clean or defective?):
  - "anomaly_image" (deciding): a linear probe on the vision tower's image tokens (flattened);
  - "anomaly_prompt": a linear probe on the last prompt hidden state.
Probes: scikit-learn's standardised L2 logistic regression, balanced accuracy of its 5-fold stratified
cross-validated predictions. Every check is an `Accuracy`: a mean of per-group hit shares with a 95 % interval over
items — how much the figure moves on other items of the same kind (on 300 items per class: about ±0.03).
Imports torch and scikit-learn; never Ray.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from visurf_ray.data.benchmark import MAX_COUNT, SEEN_COLOURS, SHAPES, empty_image, iter_split
from visurf_ray.data.prompts import format_problem
from visurf_ray.data.sample import Sample
from visurf_ray.models.inputs import (
    completion_hidden_states,
    encode_prompts,
    encode_sequences,
    image_features,
    prompt_states,
)
from visurf_ray.models.policy import Policy
from visurf_ray.rewards import count, grounding
from visurf_ray.rewards.geometry import box_iou
from visurf_ray.validation import require

PROBE_THRESHOLD = 0.8
"""Held-out probe accuracy at which a concept counts as visible to the base model (chance: 0.5)."""
PROBE_BATCH = 64  # prompts per forward pass
DECIDING = {
    "no_object": "no_object_count_answer",
    "empty_image": "empty_image_all_think",
    "anomaly": "anomaly_image",
}
"""The check that decides whether each beyond-knowledge concept is visible to the base model."""
Z_95 = 1.959964  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class Accuracy:
    """A check's figure: the mean over `groups` of each group's hit share (the classes of a balanced accuracy, the
    looks × classes of the per-look probe, one group for a plain share), with a 95 % normal-approximation interval
    over items (the groups' binomial variances; the items vary, the model and the probe's fitted folds do not).

    groups: (hits, items) per group, every group non-empty; a check with no groups (no answer found an object) is
    NaN."""

    groups: tuple[tuple[int, int], ...]

    def __post_init__(self):
        for hits, items in self.groups:
            require(
                0 <= hits <= items and items > 0, "Accuracy.groups", f"needs 0 <= hits <= items > 0, got {hits}/{items}"
            )

    @property
    def value(self) -> float:
        if not self.groups:
            return float("nan")
        return float(np.mean([hits / items for hits, items in self.groups]))

    @property
    def half_width(self) -> float:
        if not self.groups:
            return float("nan")
        variance = sum((h / n) * (1 - h / n) / n for h, n in self.groups) / len(self.groups) ** 2
        return Z_95 * float(np.sqrt(variance))

    @classmethod
    def of(cls, *hit_groups: np.ndarray) -> Accuracy:
        """From boolean hit arrays, one non-empty array per group."""
        return cls(tuple((int(np.sum(h)), len(h)) for h in hit_groups))

    def as_dict(self) -> dict:
        """{"value", "half_width", "groups"} for JSON; value and half_width are None for a NaN check."""
        finite = bool(self.groups)
        return {
            "value": self.value if finite else None,
            "half_width": self.half_width if finite else None,
            "groups": [list(group) for group in self.groups],
        }

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.half_width:.3f}"


@dataclass(frozen=True)
class Concept:
    """A binary concept of one eval split: `positive` and `negative` accept an item's meta; `reads` names the
    features a probe reads ("image": the vision tower's tokens, "prompt": the last prompt hidden state)."""

    split: str
    positive: Callable[[Mapping], bool]
    negative: Callable[[Mapping], bool]
    reads: tuple[str, ...]


def _single_query(meta: Mapping) -> bool:
    return meta["question"].startswith("Find the ") and meta["attribute"] in SEEN_COLOURS


CONCEPTS = {
    "no_object": Concept(
        "eval/grounding",
        positive=lambda m: m["kind"] == "grounding_none" and _single_query(m),
        negative=lambda m: m["kind"] == "grounding_single" and _single_query(m),
        reads=("prompt",),
    ),
    "anomaly": Concept(
        "eval/anomaly",
        positive=lambda m: m["slice"] == "clean",
        negative=lambda m: m["slice"] == "defect",
        reads=("image", "prompt"),
    ),
}


def concept_samples(concept: Concept, per_class: int, seed: int = 0) -> tuple[list[Sample], np.ndarray]:
    """The first `per_class` items of each class of `concept` from its split, and labels [2 · per_class] (1 =
    positive), positives first."""
    positives = list(itertools.islice(iter_split(concept.split, seed, where=concept.positive), per_class))
    negatives = list(itertools.islice(iter_split(concept.split, seed, where=concept.negative), per_class))
    return positives + negatives, np.array([1] * len(positives) + [0] * len(negatives))


def emptied(sample: Sample) -> Sample:
    """A grounding item's question on an empty image (an "empty_image" item: solution `[]`)."""
    meta = {**sample.meta, "kind": "grounding_empty", "slice": "empty_image", "no_object": True, "objects": 0}
    return replace(sample, id=f"{sample.id}/emptied", image=empty_image(), solution="[]", meta=meta | {"scene": []})


@torch.no_grad()
def probe_features(policy: Policy, samples: list[Sample]) -> dict[str, np.ndarray]:
    """{"image": [N, image tokens · hidden] the vision tower's tokens flattened, "prompt": [N, hidden] the language
    model's last hidden state at each prompt's last token}, float64, in the order of `samples`."""
    was_training = policy.model.training
    policy.model.eval()
    image, prompt = [], []
    for first in range(0, len(samples), PROBE_BATCH):
        batch = samples[first : first + PROBE_BATCH]
        prompts = encode_prompts(policy, [s.image for s in batch], [s.problem for s in batch]).to(policy.device)
        features = image_features(policy.model, prompts)
        image += [f.flatten().double().cpu().numpy() for f in features]
        prompt += list(prompt_states(policy.model, prompts, features).last_hidden.double().cpu().numpy())
    policy.model.train(was_training)
    return {"image": np.stack(image), "prompt": np.stack(prompt)}


def probe_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0) -> Accuracy:
    """Balanced accuracy of a standardised L2 logistic regression's held-out predictions, stratified `folds`-fold
    cross-validation (with balanced classes, its plain accuracy).

    features: [N, D]; labels: [N] integer classes (2 or more), each at least `folds` times."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    hits = cross_val_predict(probe, features, labels, cv=splits) == labels
    return Accuracy.of(*(hits[labels == label] for label in np.unique(labels)[::-1]))


def look_presence_accuracy(policy: Policy, per_class: int, seed: int = 0) -> Accuracy:
    """Mean over the pretraining colour × shape looks of a probe's held-out accuracy on "is the asked look in the
    image?" from the image tokens max-pooled over positions, `per_class` no-object and single-object items per look."""
    hidden = policy.model.config.get_text_config().hidden_size
    groups: tuple[tuple[int, int], ...] = ()
    for colour, shape in itertools.product(SEEN_COLOURS, SHAPES):
        absent, present = (_items_asking(colour, shape, side, per_class, seed) for side in ("positive", "negative"))
        labels = np.array([1] * per_class + [0] * per_class)
        image = probe_features(policy, absent + present)["image"].reshape(2 * per_class, -1, hidden)
        groups += probe_accuracy(image.max(axis=1), labels, seed=seed).groups
    return Accuracy(groups)


def _items_asking(colour: str, shape: str, side: str, count: int, seed: int) -> list[Sample]:
    """The first `count` items of the no-object concept's `side` ("positive": absent, "negative": present) whose
    query asks for `colour` `shape`."""
    accepts = getattr(CONCEPTS["no_object"], side)
    where = lambda m: accepts(m) and m["attribute"] == colour and m["shape"] == shape  # noqa: E731
    return list(itertools.islice(iter_split(CONCEPTS["no_object"].split, seed, where=where), count))


def count_question(sample: Sample, *, look: bool = True) -> Sample:
    """A single-object grounding item asked as a count question on the same image: about the grounding query's look
    ("How many red circles are there?"), or with `look=False` about every shape ("How many shapes are there?")."""
    asked = f"{sample.meta['attribute']} {sample.meta['shape']}s" if look else "shapes"
    question = f"How many {asked} are there?"
    return replace(sample, task="count", problem=format_problem("count", question), solution="\\boxed{0}")


THINK_COUNT = re.compile(r"<think>I count (\d+) ")
"""The count a count answer's think states ("<think>I count 2 red circles.")."""


def count_zero_accuracies(
    policy: Policy, samples: list[Sample], absent: np.ndarray, max_new_tokens: int, *, look: bool = True
) -> dict[str, Accuracy]:
    """Balanced accuracies of 0 against `absent` [N] in the policy's greedy answers to `count_question(s, look=look)`
    of each sample: {"answer": the boxed answer is 0, "think": the think's "I count N" is 0}."""
    from visurf_ray.train.evaluate import greedy_answers

    answers = greedy_answers(policy, [count_question(s, look=look) for s in samples], max_new_tokens)
    thinks = [THINK_COUNT.match(a) for a in answers]
    says_none = {
        "answer": np.array([count.parse_prediction(a) == 0 for a in answers]),
        "think": np.array([t is not None and int(t.group(1)) == 0 for t in thinks]),
    }
    return {name: Accuracy.of(zero[absent == 1], ~zero[absent == 0]) for name, zero in says_none.items()}


def binding_outcomes(samples: list[Sample], answers: list[str]) -> dict[str, int]:
    """How many of the `answers` to two-object single-object queries (`samples`) put their first box (IoU > 0.5) on
    the "asked" object, on the "other" one, on neither but on a "mixed" phantom (one object's columns, the other's
    rows), or "none" of these (no box, or elsewhere). Objects are `meta["scene"]`."""
    outcomes = dict.fromkeys(("asked", "other", "mixed", "none"), 0)
    for sample, answer in zip(samples, answers, strict=True):
        if sample.meta.get("objects") != 2 or "scene" not in sample.meta:
            raise ValueError(f"query binding needs two-object grounding items; {sample.id} is not one")
        prediction = grounding.parse_prediction(answer)
        box = prediction[0][0] if prediction else None
        asked_look = (sample.meta["attribute"], sample.meta["shape"])
        first, second = sample.meta["scene"]
        asked, other = (first, second) if (first["colour"], first["shape"]) == asked_look else (second, first)
        (ax1, ay1, ax2, ay2), (ox1, oy1, ox2, oy2) = asked["bbox_2d"], other["bbox_2d"]
        phantoms = ((ax1, oy1, ax2, oy2), (ox1, ay1, ox2, ay2))
        if box is None:
            outcome = "none"
        elif box_iou(box, tuple(asked["bbox_2d"])) > 0.5:
            outcome = "asked"
        elif box_iou(box, tuple(other["bbox_2d"])) > 0.5:
            outcome = "other"
        elif any(box_iou(box, phantom) > 0.5 for phantom in phantoms):
            outcome = "mixed"
        else:
            outcome = "none"
        outcomes[outcome] += 1
    return outcomes


def binding_share(outcomes: Mapping[str, int]) -> Accuracy:
    """Of the answers whose box finds one of the two objects (`binding_outcomes`), the share on the asked one (chance
    0.5); NaN if none finds any."""
    found = outcomes["asked"] + outcomes["other"]
    return Accuracy(((outcomes["asked"], found),) if found else ())


def reading_questions(count: int, seed: int = 0) -> list[Sample]:
    """The first `count` held-out count items whose question names a colour, a shape or a colour × shape."""
    where = lambda m: m["form"] in ("colour", "shape", "colour_shape")  # noqa: E731
    return list(itertools.islice(iter_split("retained/count", seed, where=where), count))


def reading_share(samples: list[Sample], answers: list[str]) -> Accuracy:
    """Share of the `answers` to count questions `samples` ("How many <look>s are there?") whose think names the asked
    look right after its count ("<think>I count 2 red circles." or "I count 1 red circle.")."""
    named = []
    for sample, answer in zip(samples, answers, strict=True):
        asked = re.search(r"How many (.+?)s are there\?", sample.problem)
        if asked is None:
            raise ValueError(f"query reading needs 'How many <look>s are there?' questions; {sample.id} is not one")
        think = re.match(r"<think>I count \d+ (.+?)s?\.", answer)
        named.append(think is not None and think.group(1) == asked.group(1))
    return Accuracy.of(np.array(named))


COUNT_PREFIX = "<think>I count "
"""The completion prefix after which a count answer writes its number."""


def selection_questions(count: int, seed: int = 0) -> list[Sample]:
    """The first `count` held-out "How many <colour> shapes are there?" count items (pretraining colours)."""
    return list(itertools.islice(iter_split("retained/count", seed, where=lambda m: m["form"] == "colour"), count))


@torch.no_grad()
def count_answer_states(policy: Policy, samples: list[Sample]) -> np.ndarray:
    """[N, hidden] float64: the language model's last hidden state at the last token of COUNT_PREFIX, forced as the
    completion of each sample's prompt — the state that predicts the count."""
    was_training = policy.model.training
    policy.model.eval()
    prefix = policy.tokenizer(COUNT_PREFIX, add_special_tokens=False)["input_ids"]
    states = []
    for first in range(0, len(samples), PROBE_BATCH):
        batch = samples[first : first + PROBE_BATCH]
        prompts = encode_prompts(policy, [s.image for s in batch], [s.problem for s in batch]).to(policy.device)
        sequences = encode_sequences(policy, prompts, [prefix] * len(batch), list(range(len(batch))))
        last_layer = completion_hidden_states(policy.model, sequences)[-1]
        states += list(last_layer[:, -1].double().cpu().numpy())  # equal prefixes: no padding
    policy.model.train(was_training)
    return np.stack(states)


def selection_accuracies(policy: Policy, samples: list[Sample], *, seed: int = 0) -> dict[str, Accuracy]:
    """Probes on `count_answer_states` of "How many <colour> shapes are there?" items (`selection_questions`):
    {"asked": which colour the question names, "colours": the mean over SEEN_COLOURS of whether that colour is in
    the image, "answer": whether the asked colour is (the item's count > 0), "by_objects": the "answer" probe on the
    one-hot number of objects instead of the states}."""
    states = count_answer_states(policy, samples)
    asked = np.array([SEEN_COLOURS.index(s.meta["question"].split()[2]) for s in samples])
    present = np.array([[any(o["colour"] == c for o in s.meta["scene"]) for c in SEEN_COLOURS] for s in samples])
    colours = [probe_accuracy(states, present[:, index].astype(int), seed=seed) for index in range(len(SEEN_COLOURS))]
    answer = np.array([s.meta["count"] > 0 for s in samples], dtype=int)
    objects = np.eye(MAX_COUNT + 1)[[s.meta["objects"] for s in samples]]
    return {
        "asked": probe_accuracy(states, asked, seed=seed),
        "colours": Accuracy(tuple(group for accuracy in colours for group in accuracy.groups)),
        "answer": probe_accuracy(states, answer, seed=seed),
        "by_objects": probe_accuracy(objects, answer, seed=seed),
    }


def two_object_queries(count: int, seed: int = 0) -> list[Sample]:
    """The first `count` held-out two-object "Find the <colour> <shape>." items (pretraining colours)."""
    concept = CONCEPTS["no_object"]
    where = lambda m: concept.negative(m) and m["objects"] == 2  # noqa: E731
    return list(itertools.islice(iter_split(concept.split, seed, where=where), count))


def perception_checks(
    policy: Policy, *, per_class: int = 100, per_look: int = 100, seed: int = 0, max_new_tokens: int = 128
) -> dict[str, Accuracy]:
    """Every check's accuracy by name (module docstring): probes `<concept>_<features>` for every feature set a
    concept reads, "no_object_count_{answer,think}", "no_object_image_per_look" on `per_look` items per class and
    look, "empty_image_{all,count}_{answer,think}" and "empty_image_prompt" on `per_class` pairs, "query_binding",
    "query_binding_mixed" and "query_reading" on 2 · `per_class` items each, and "query_selection_{asked,colours,
    answer,by_objects}" on 4 · `per_class` count questions."""
    results = {}
    for name, concept in CONCEPTS.items():
        samples, labels = concept_samples(concept, per_class, seed)
        features = probe_features(policy, samples)
        for reads in concept.reads:
            results[f"{name}_{reads}"] = probe_accuracy(features[reads], labels, seed=seed)
        if name == "no_object":
            for reads, accuracy in count_zero_accuracies(policy, samples, labels, max_new_tokens).items():
                results[f"no_object_count_{reads}"] = accuracy
            results["no_object_image_per_look"] = look_presence_accuracy(policy, per_look, seed)
            present = [s for s, label in zip(samples, labels, strict=True) if label == 0]
            pairs = [emptied(s) for s in present] + present
            empty = np.array([1] * len(present) + [0] * len(present))
            results["empty_image_prompt"] = probe_accuracy(probe_features(policy, pairs)["prompt"], empty, seed=seed)
            for look, asked in ((False, "all"), (True, "count")):
                for reads, accuracy in count_zero_accuracies(policy, pairs, empty, max_new_tokens, look=look).items():
                    results[f"empty_image_{asked}_{reads}"] = accuracy
    from visurf_ray.train.evaluate import greedy_answers

    queries = two_object_queries(2 * per_class, seed)
    outcomes = binding_outcomes(queries, greedy_answers(policy, queries, max_new_tokens))
    results["query_binding"] = binding_share(outcomes)
    results["query_binding_mixed"] = Accuracy(((outcomes["mixed"], len(queries)),))
    questions = reading_questions(2 * per_class, seed)
    results["query_reading"] = reading_share(questions, greedy_answers(policy, questions, max_new_tokens))
    for name, accuracy in selection_accuracies(policy, selection_questions(4 * per_class, seed), seed=seed).items():
        results[f"query_selection_{name}"] = accuracy
    return results
