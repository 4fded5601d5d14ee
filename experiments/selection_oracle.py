"""Is the failure to select image tokens by the question the language model's, or the image tokens'?

The base model reads which colour a count question asks and sees the objects, yet its answer says whether the asked
colour is there no better than the number of objects predicts (README, "Where selection fails"). This experiment
trains a fresh tiny VLM of the default size on "How many <colour> shapes are there?" count items only (pretraining
colours, 32 per step, AdamW, constant lr after 30 warm-up steps) with its image tokens coming from one source:

- "learned": the model's own vision tower, trained with it (the base model's situation);
- "oracle": a clean code — each image token's palette colours (multi-hot, read from its pixels), linearly embedded;
  background tokens are zero. The language model must still choose the tokens whose colour the question names;
- "frozen": a base model's vision tower (`--base`), frozen, under the fresh language model;
- "oracle+frozen": the oracle's code plus the frozen tower's tokens, standardised per dimension and scaled by
  `--nuisance` × the oracle's initial std: the clean colour signal is there, beside what the base model's tokens hold;
- "oracle+shared": the oracle's code plus one fixed direction added to every object token, of norm `--nuisance` ×
  the oracle's initial per-colour norm: the geometry measured on the base model's tokens (`token_geometry`), where
  every object token shares one large direction and colours differ little;
- "masks": a clean code of everything the image shows — each image token is a linear embedding (learned) of its
  patches' pixel masks per palette colour; background tokens are zero. Colour, shape and an object's offset inside
  the token are all there, linearly: unlike "oracle", the language model must select by colour among tokens that
  also differ in what grounding needs;
- "pretrained": the model's own vision tower, first pretrained alone (`--tower-steps`) to name every patch's look
  (`pretrain_tower`: colour × shape × which quarter of the object, or background), then frozen — a tower trained
  for looks before a language model reads it.

`--question presence` asks the same items as "Is there a <colour> shape?" (think "There is a/no <colour> shape.",
answer `\\boxed{yes}` / `\\boxed{no}`): the bit the check needs as the whole target, without the count.

Every `--eval-every` steps it answers 300 held-out questions greedily and reports the share of exactly right answers
and the balanced accuracy of answering that the asked colour is absent (0, or "no") against its absence (chance 0.5).
`--geometry` prints the norms, cosines and per-token colour probes of a policy's image tokens instead.

Examples:
    python experiments/selection_oracle.py --vision oracle --out runs/selection_oracle/oracle.json
    python experiments/selection_oracle.py --vision frozen --out runs/selection_oracle/frozen.json
    python experiments/selection_oracle.py --vision pretrained --out runs/selection_oracle/pretrained.json
    python experiments/selection_oracle.py --vision learned --question presence --lr 1e-3 --out runs/presence.json
    python experiments/selection_oracle.py --geometry        # the cached base model's image tokens
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visurf_ray.data.answers import count_answer
from visurf_ray.data.benchmark import CELL, COLOURS, GRID, OBJECT_CELLS, SEEN_COLOURS, SHAPES, iter_split, text_corpus
from visurf_ray.data.sample import Sample
from visurf_ray.models import Policy, build_tiny_vlm, load_policy
from visurf_ray.models.inputs import encode_prompts, image_features
from visurf_ray.rewards import count as count_reward
from visurf_ray.train.evaluate import greedy_answers
from visurf_ray.train.perception import Accuracy, probe_accuracy
from visurf_ray.train.pretrain import PretrainConfig, base_model_dir, sft_update

VISION_SOURCES = ("learned", "oracle", "frozen", "oracle+frozen", "oracle+shared", "masks", "pretrained")
QUESTIONS = ("count", "presence")
COLOUR_TOLERANCE = 0.05  # normalised-pixel distance within which a pixel is a palette colour
WARMUP_STEPS = 30
BATCH_SIZE = 32


def palette_masks(processor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[patches, len(COLOURS), patch, patch] bool: which pixels of each patch show each palette colour, from a
    Qwen2-VL image `processor`'s normalised patches (`pixel_values` [patches, 3 · temporal · patch²], a merge group's
    patches consecutive, as that processor orders them)."""
    patch = processor.patch_size
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    palette = (torch.tensor(list(COLOURS.values()), dtype=torch.float32).view(-1, 3, 1, 1) / 255.0 - mean) / std
    frames = pixel_values.detach().float().cpu().view(-1, 3, processor.temporal_patch_size, patch, patch)[:, :, 0]
    return (frames[:, None] - palette[None]).abs().amax(dim=2) < COLOUR_TOLERANCE


def token_colours(processor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[image tokens, len(COLOURS)] bool: which palette colours each image token's pixels contain (`palette_masks`)."""
    merged = processor.merge_size**2
    return palette_masks(processor, pixel_values).flatten(2).any(-1).view(-1, merged, len(COLOURS)).any(1)


class OracleVision(nn.Module):
    """Stands in for the vision tower: each image token is a learned linear embedding of `token_colours` (std
    `init_std`), plus, optionally, a frozen vision tower's tokens standardised per dimension (`frozen`, with
    `frozen_mean`/`frozen_std` over reference tokens) times `nuisance` · `init_std`, or a fixed shared direction of
    norm `shared_norm` added to every object token."""

    def __init__(
        self,
        image_processor,
        hidden: int,
        *,
        init_std: float,
        seed: int,
        frozen: nn.Module | None = None,
        frozen_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        nuisance: float = 0.0,
        shared_norm: float = 0.0,
    ):
        super().__init__()
        self.image_processor = image_processor
        self.spatial_merge_size = image_processor.merge_size
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Linear(len(COLOURS), hidden, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(hidden, len(COLOURS), generator=generator) * init_std)
        direction = torch.randn(hidden, generator=generator)
        self.register_buffer("shared", direction / direction.norm() * shared_norm)
        self.frozen = frozen  # its parameters stay as the caller froze them
        if frozen is not None:
            if frozen_stats is None:
                raise ValueError("OracleVision: a frozen tower needs frozen_stats (its tokens' mean and std)")
            mean, std = frozen_stats
            self.register_buffer("frozen_mean", mean)
            self.register_buffer("frozen_std", std)
        self.nuisance_scale = nuisance * init_std

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, pixel_values, grid_thw=None, **kwargs):
        present = token_colours(self.image_processor, pixel_values).to(self.embed.weight)
        tokens = self.embed(present) + present.any(-1, keepdim=True) * self.shared
        if self.frozen is not None:
            raw = self.frozen(pixel_values, grid_thw=grid_thw).pooler_output
            tokens = tokens + (raw - self.frozen_mean) / self.frozen_std * self.nuisance_scale
        return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=tokens)


class MaskVision(nn.Module):
    """Stands in for the vision tower: each image token is a learned linear embedding of its patches'
    `palette_masks` (weights drawn with std `init_std` / √(2 · patch²), so that a token half covered by one colour
    has about the oracle's norm for that colour); background tokens are zero."""

    def __init__(self, image_processor, hidden: int, *, init_std: float, seed: int):
        super().__init__()
        self.image_processor = image_processor
        self.spatial_merge_size = image_processor.merge_size
        pixels = image_processor.patch_size**2
        inputs = image_processor.merge_size**2 * len(COLOURS) * pixels
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Linear(inputs, hidden, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(hidden, inputs, generator=generator) * init_std / (2 * pixels) ** 0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, pixel_values, grid_thw=None, **kwargs):
        masks = palette_masks(self.image_processor, pixel_values).to(self.embed.weight)
        tokens = self.embed(masks.view(-1, self.embed.in_features))
        return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=tokens)


PATCH_LOOKS = 1 + len(SEEN_COLOURS) * len(SHAPES) * OBJECT_CELLS**2
"""Classes of a patch in `pretrain_tower`: background, or colour × shape × which cell of the object it shows."""
TOWER_KINDS = ("grounding_single", "grounding_multi", "count")
"""Pretraining kinds whose images are shapes on the background, with their scene in `Sample.meta["scene"]`."""


def patch_looks(sample: Sample, merge: int) -> torch.Tensor:
    """[image tokens, merge²] long: the `PATCH_LOOKS` class of every patch of `sample`'s image, a token's patches in
    the image processor's order (row-major within the token, tokens row-major)."""
    labels = torch.zeros(GRID, GRID, dtype=torch.long)
    for index, item in enumerate(sample.meta["scene"]):
        if item["colour"] not in SEEN_COLOURS or item["shape"] not in SHAPES:
            raise ValueError(f"{sample.content_key()}: scene object {index} has no pretraining look: {item}")
        col, row = item["bbox_2d"][0] // CELL, item["bbox_2d"][1] // CELL
        look = SEEN_COLOURS.index(item["colour"]) * len(SHAPES) + SHAPES.index(item["shape"])
        for dy, dx in itertools.product(range(OBJECT_CELLS), range(OBJECT_CELLS)):
            labels[row + dy, col + dx] = 1 + look * OBJECT_CELLS**2 + dy * OBJECT_CELLS + dx
    tokens = GRID // merge
    return labels.view(tokens, merge, tokens, merge).permute(0, 2, 1, 3).reshape(tokens * tokens, merge * merge)


def pretrain_tower(policy: Policy, *, steps: int, seed: int, lr: float = 1e-3, log=print) -> float:
    """Train `policy`'s vision tower alone, with a linear head on its image tokens, to name every patch's look
    (`patch_looks`; cross-entropy) on `TOWER_KINDS` pretraining images, `BATCH_SIZE` per step, AdamW at `lr` after
    `WARMUP_STEPS` warm-up steps. Returns the head's accuracy on the object patches of 200 held-out images."""
    model, merge = policy.model, policy.processor.image_processor.merge_size
    head = nn.Linear(model.config.text_config.hidden_size, merge * merge * PATCH_LOOKS)
    parameters = [*model.model.visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr)

    def logits_and_labels(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = encode_prompts(policy, [s.image for s in samples], [s.problem for s in samples])
        logits = head(torch.cat(image_features(model, prompts))).view(-1, PATCH_LOOKS)
        return logits, torch.cat([patch_looks(s, merge) for s in samples]).view(-1)

    stream = iter_split("pretrain", seed, where=lambda meta: meta["kind"] in TOWER_KINDS)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS)
        logits, labels = logits_and_labels(list(itertools.islice(stream, BATCH_SIZE)))
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0:
            log(json.dumps({"tower_step": step + 1, "loss": round(loss.item(), 5)}))
    held_out = list(itertools.islice(iter_split("retained/count", seed), 200))
    with torch.no_grad():
        logits, labels = logits_and_labels(held_out)
    objects = labels > 0
    return float((logits.argmax(-1)[objects] == labels[objects]).float().mean())


def colour_questions(split: str, seed: int, question: str = "count") -> Iterator[Sample]:
    """The "How many <colour> shapes are there?" count items of `split`, in stream order; with `question`
    "presence", each asked as `presence_question`."""
    items = iter_split(split, seed, where=lambda meta: meta["form"] == "colour")
    return items if question == "count" else map(presence_question, items)


ASKED_COLOUR = re.compile(r"How many (\w+) shapes are there\?")


def presence_question(sample: Sample) -> Sample:
    """A "How many <colour> shapes are there?" count item asked as "Is there a <colour> shape?" on the same image:
    think "There is a/no <colour> shape.", solution `\\boxed{yes}` or `\\boxed{no}`."""
    asked = ASKED_COLOUR.match(sample.problem)
    if asked is None:
        raise ValueError(f"{sample.id}: not a colour count question: {sample.problem!r}")
    colour, present = asked.group(1), sample.meta["count"] > 0
    return replace(
        sample,
        problem=f"Is there a {colour} shape? Reply <think>...</think><answer>\\boxed{{yes or no}}</answer>.",
        solution=count_answer("yes" if present else "no"),
        meta={**sample.meta, "think": f"There is {'a' if present else 'no'} {colour} shape."},
    )


def image_tokens(policy: Policy, samples: list[Sample]) -> torch.Tensor:
    """[image tokens of all `samples`, hidden]: `policy`'s vision tower's output for their images, in order."""
    prompts = encode_prompts(policy, [s.image for s in samples], [s.problem for s in samples])
    with torch.no_grad():
        return torch.cat(image_features(policy.model, prompts))


def fresh_policy(
    source: str,
    *,
    base: Path | None,
    seed: int,
    nuisance: float,
    init_std: float,
    tower_steps: int = 0,
    log=print,
) -> tuple[Policy, dict]:
    """A fresh default-size tiny VLM whose image tokens come from `source` (VISION_SOURCES), and what building it
    measured: for "pretrained", whose tower first trains for `tower_steps` steps (`pretrain_tower`, logging to
    `log`), {"tower_patch_accuracy"}; else {}."""
    cfg = PretrainConfig(seed=seed)
    policy = build_tiny_vlm(text_corpus(seed, cfg.corpus_size), cfg.spec, seed=seed)
    model = policy.model.model
    frozen, measured = None, {}
    if source == "pretrained":
        measured["tower_patch_accuracy"] = pretrain_tower(policy, steps=tower_steps, seed=seed, log=log)
        model.visual.requires_grad_(False)
    if source == "masks":
        model.visual = MaskVision(policy.processor.image_processor, cfg.spec.text_hidden, init_std=init_std, seed=seed)
    if source in ("frozen", "oracle+frozen"):
        if base is None or not base.is_dir():
            raise FileNotFoundError(f"--vision {source} needs a base model folder (--base), got {base}")
        model.visual.load_state_dict(load_policy(base).model.model.visual.state_dict())
        frozen = model.visual
        frozen.requires_grad_(False)
    if source in ("oracle", "oracle+frozen", "oracle+shared"):
        stats = None
        if frozen is not None:
            reference = image_tokens(policy, list(itertools.islice(colour_questions("pretrain/count", seed + 1), 200)))
            stats = reference.mean(0), reference.std(0) + 1e-6
        shared = nuisance * init_std * cfg.spec.text_hidden**0.5 if source == "oracle+shared" else 0.0
        model.visual = OracleVision(
            policy.processor.image_processor,
            cfg.spec.text_hidden,
            init_std=init_std,
            seed=seed,
            frozen=frozen if source == "oracle+frozen" else None,
            frozen_stats=stats,
            nuisance=nuisance,
            shared_norm=shared,
        )
    policy.model.train()
    return policy, measured


def count_scores(policy: Policy, samples: list[Sample], max_new_tokens: int) -> dict:
    """`answer_scores` of the policy's greedy answers to `samples`."""
    was_training = policy.model.training
    policy.model.eval()
    answers = greedy_answers(policy, samples, max_new_tokens)
    policy.model.train(was_training)
    return answer_scores(samples, answers)


def answer_scores(samples: list[Sample], answers: list[str]) -> dict:
    """The share of `answers` the count task's verifier accepts, and the balanced accuracy of answering that the
    asked colour is absent (0, or "no") against its absence (`meta["count"]` 0); the first answer as an example."""
    absent = np.array([s.meta["count"] == 0 for s in samples])
    exact = [count_reward.is_success(count_reward.score(a, s.solution)) for a, s in zip(answers, samples, strict=True)]
    says_absent = np.array([count_reward.parse_prediction(answer) in (0, "no") for answer in answers])
    return {
        "exact": float(np.mean(exact)),
        "zero_vs_absent": Accuracy.of(says_absent[absent], ~says_absent[~absent]).as_dict(),
        "example": answers[0],
    }


def train(args: argparse.Namespace, log=print) -> dict:
    """Train a fresh policy with `args.vision`'s image tokens; the scores every `args.eval_every` steps."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    policy, measured = fresh_policy(
        args.vision,
        base=args.base,
        seed=args.seed,
        nuisance=args.nuisance,
        init_std=args.init_std,
        tower_steps=args.tower_steps,
        log=log,
    )
    if measured:
        log(json.dumps(measured))
    held_out = list(itertools.islice(colour_questions("retained/count", args.seed, args.question), args.eval_items))
    stream = colour_questions("pretrain/count", args.seed, args.question)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=args.lr)
    rows, losses, start = [], [], time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / WARMUP_STEPS)
        batch = list(itertools.islice(stream, BATCH_SIZE))
        losses.append(sft_update(policy, optimizer, batch, groups=3, grad_clip=1.0))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row = {"step": step + 1, "loss": float(np.mean(losses[-args.eval_every :]))}
            row |= count_scores(policy, held_out, args.max_new_tokens)
            row["seconds"] = round(time.perf_counter() - start, 1)
            log(json.dumps(row))
            rows.append(row)
    args_text = {k: str(v) for k, v in vars(args).items()}
    return {
        "vision": args.vision,
        "question": args.question,
        "args": args_text,
        "vision_measured": measured,
        "scores": rows,
    }


def token_geometry(policy: Policy, samples: list[Sample]) -> dict:
    """Norms of `policy`'s image tokens (background, object), the mean cosine between tokens showing one colour
    alone, for every pair of SEEN_COLOURS and the background, and a linear probe of each colour's presence on single
    object tokens (`perception.probe_accuracy`: standardised, 5-fold): {"norms", "cosines": {a: {b}}, "probes"}."""
    prompts = encode_prompts(policy, [s.image for s in samples], [s.problem for s in samples])
    with torch.no_grad():
        tokens = torch.cat(image_features(policy.model, prompts)).double()
    colours = token_colours(policy.processor.image_processor, prompts.pixel_values)
    groups = {"background": ~colours.any(1)}
    for index, colour in enumerate(COLOURS):
        if colour in SEEN_COLOURS:
            groups[colour] = colours[:, index] & (colours.sum(1) == 1)
    unit = nn.functional.normalize(tokens, dim=-1)
    objects = tokens[~groups["background"]]
    return {
        "norms": {
            "background": float(tokens[groups["background"]].norm(dim=-1).mean()),
            "objects": float(objects.norm(dim=-1).mean()),
        },
        "cosines": {a: {b: float((unit[groups[a]] @ unit[groups[b]].T).mean()) for b in groups} for a in groups},
        "probes": {
            colour: probe_accuracy(objects.numpy(), colours[~groups["background"], index].numpy().astype(int)).value
            for index, colour in enumerate(COLOURS)
            if colour in SEEN_COLOURS
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", choices=VISION_SOURCES, default="oracle")
    parser.add_argument("--base", type=Path, default=base_model_dir(), help="base model for the frozen sources")
    parser.add_argument("--question", choices=QUESTIONS, default="count", help="how the colour items are asked")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--init-std", type=float, default=0.5, help="std of the oracle code's embedding")
    parser.add_argument("--tower-steps", type=int, default=400, help="steps of the pretrained source's tower")
    parser.add_argument("--nuisance", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-items", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--geometry", action="store_true", help="print --base's image-token geometry and stop")
    parser.add_argument("--out", type=Path, help="JSON file for the result")
    args = parser.parse_args(argv)
    if args.tower_steps < 1:
        parser.error(f"--tower-steps must be at least 1, got {args.tower_steps}")
    if args.geometry:
        samples = list(itertools.islice(colour_questions("retained/count", args.seed), args.eval_items))
        result = token_geometry(load_policy(args.base), samples)
    else:
        result = train(args)
    text = json.dumps(result, indent=1)
    print(text if args.geometry else f"final: {json.dumps(result['scores'][-1])}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
