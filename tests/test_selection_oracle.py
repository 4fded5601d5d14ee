"""Tests of the selection experiment (experiments/selection_oracle.py): the oracle code reads each image token's
colours from its pixels exactly as the scene places the objects; the oracle's and the mask code's tokens are what they
say; the tower's patch labels agree with the pixels; tower pretraining learns them; the presence form asks the same
items; every image source and question form trains and is scored; the token geometry and probes are reported by
colour."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from experiments.selection_oracle import (
    PATCH_LOOKS,
    QUESTIONS,
    VISION_SOURCES,
    MaskVision,
    OracleVision,
    answer_scores,
    colour_questions,
    fresh_policy,
    main,
    palette_masks,
    patch_looks,
    presence_question,
    pretrain_tower,
    token_colours,
    token_geometry,
)
from visurf_ray.data.benchmark import COLOURS, SEEN_COLOURS, SHAPES, empty_image
from visurf_ray.models import build_tiny_vlm
from visurf_ray.models.inputs import encode_prompts
from visurf_ray.models.processor import build_image_processor

TOKEN = 28  # pixels per image-token side at the default spec


def scene_token_colours(scene) -> np.ndarray:
    """[16, colours] from the scene: a token shows an object's colour when the object's 2 x 2-cell block overlaps it."""
    expected = np.zeros((16, len(COLOURS)), dtype=bool)
    for item in scene:
        x1, y1, x2, y2 = item["bbox_2d"]
        for row, col in itertools.product(range(y1 // TOKEN, y2 // TOKEN + 1), range(x1 // TOKEN, x2 // TOKEN + 1)):
            expected[row * 4 + col, list(COLOURS).index(item["colour"])] = True
    return expected


def test_token_colours_follow_the_scene():
    processor = build_image_processor(image_size=112, patch_size=14, merge_size=2)
    samples = list(itertools.islice(colour_questions("pretrain/count", 0), 12))
    assert sum(len(s.meta["scene"]) for s in samples) > 20  # objects straddling tokens included
    for sample in samples:
        pixels = processor(images=[sample.image], return_tensors="pt")["pixel_values"]
        assert np.array_equal(token_colours(processor, pixels).numpy(), scene_token_colours(sample.meta["scene"]))


def test_the_presence_form_asks_each_count_item_whether_its_colour_is_there():
    counts = list(itertools.islice(colour_questions("pretrain/count", 0), 40))
    presence = list(itertools.islice(colour_questions("pretrain/count", 0, "presence"), 40))
    assert {s.meta["count"] == 0 for s in counts} == {True, False}
    for asked, item in zip(counts, presence, strict=True):
        colour = asked.problem.split()[2]
        answer = "no" if asked.meta["count"] == 0 else "yes"
        assert item.image.tobytes() == asked.image.tobytes() and item.problem.startswith(
            f"Is there a {colour} shape? Reply <think>"
        )
        assert item.solution == f"\\boxed{{{answer}}}"
        assert item.meta["think"] == f"There is {'no' if answer == 'no' else 'a'} {colour} shape."
    with pytest.raises(ValueError, match="not a colour count question"):
        presence_question(presence[0])


def test_scores_read_zero_and_no_as_absent():
    samples = list(itertools.islice(colour_questions("retained/count", 0, "presence"), 12))
    absent = np.array([s.meta["count"] == 0 for s in samples])
    assert 0 < absent.sum() < len(samples)
    replies = ["no" if gone else "yes" for gone in absent]
    replies[0] = "yes" if absent[0] else "no"  # one wrong answer, then a count answer (never exact)
    replies[1] = "0"
    answers = [f"<think>x</think><answer>\\boxed{{{reply}}}</answer>" for reply in replies]
    scores = answer_scores(samples, answers)
    assert scores["exact"] == pytest.approx((len(samples) - 2) / len(samples))
    says_absent = np.array([reply in ("no", "0") for reply in replies])
    hits = says_absent == absent
    assert scores["zero_vs_absent"]["groups"] == [
        [int(hits[absent].sum()), int(absent.sum())],
        [int(hits[~absent].sum()), int((~absent).sum())],
    ]


@pytest.fixture(scope="module")
def default_size_policy():
    from visurf_ray.data.benchmark import text_corpus

    return build_tiny_vlm(text_corpus(seed=0, n=200), seed=0)


@pytest.fixture(scope="module")
def scene_and_empty_prompts(default_size_policy):
    """(image processor, prompts): a count item with objects, then the same question on the empty image."""
    sample = next(s for s in colour_questions("pretrain/count", 0) if s.meta["scene"])
    prompts = encode_prompts(default_size_policy, [sample.image, empty_image()], [sample.problem] * 2)
    return default_size_policy.processor.image_processor, prompts


def test_the_oracle_embeds_colours_zeroes_the_background_and_adds_the_shared_direction(scene_and_empty_prompts):
    processor, prompts = scene_and_empty_prompts
    plain = OracleVision(processor, 128, init_std=0.5, seed=0)
    shared = OracleVision(processor, 128, init_std=0.5, seed=0, shared_norm=3.0)
    clean = plain(prompts.pixel_values, prompts.image_grid_thw).pooler_output
    with_shared = shared(prompts.pixel_values, prompts.image_grid_thw).pooler_output
    colours = token_colours(processor, prompts.pixel_values)
    torch.testing.assert_close(clean, colours.float() @ plain.embed.weight.T)
    assert clean[16:].abs().max() == 0 and colours[:16].any()  # the empty image: 16 zero tokens
    objects = colours.any(1)
    torch.testing.assert_close((with_shared - clean)[objects].norm(dim=-1), torch.full((int(objects.sum()),), 3.0))
    assert (with_shared - clean)[~objects].abs().max() == 0


def test_the_mask_code_embeds_each_patch_colour_mask_and_zeroes_the_background(scene_and_empty_prompts):
    processor, prompts = scene_and_empty_prompts
    vision = MaskVision(processor, 128, init_std=0.5, seed=0)
    tokens = vision(prompts.pixel_values, prompts.image_grid_thw).pooler_output
    masks = palette_masks(processor, prompts.pixel_values).float()  # [patches, colours, 14, 14]
    assert masks.shape == (128, len(COLOURS), 14, 14) and masks[:64].sum() > 0
    torch.testing.assert_close(tokens, masks.reshape(32, -1) @ vision.embed.weight.T)
    assert tokens[16:].abs().max() == 0  # the empty image
    objects = token_colours(processor, prompts.pixel_values)[:16].any(1)
    assert (tokens[:16].norm(dim=-1) > 0).tolist() == objects.tolist()


def test_patch_looks_name_each_objects_cells_where_its_pixels_are():
    processor = build_image_processor(image_size=112, patch_size=14, merge_size=2)
    samples = list(itertools.islice(colour_questions("pretrain/count", 0), 12))
    for sample in samples:
        pixels = processor(images=[sample.image], return_tensors="pt")["pixel_values"]
        labels = patch_looks(sample, merge=2).view(-1)  # the processor's patch order
        shown = palette_masks(processor, pixels).flatten(2).any(-1)  # [patches, colours]
        assert int((labels > 0).sum()) == 4 * len(sample.meta["scene"])
        assert not shown[labels == 0].any()  # a background patch shows no palette colour
        for patch in torch.nonzero(shown.any(1)).view(-1).tolist():  # each coloured patch: its object's colour
            look = (int(labels[patch]) - 1) // 4
            colour = SEEN_COLOURS[look // len(SHAPES)]
            assert labels[patch] > 0 and shown[patch].nonzero().view(-1).tolist() == [list(COLOURS).index(colour)]
        assert int(labels.max()) < PATCH_LOOKS


def test_pretrain_tower_learns_the_patch_looks():
    policy, measured = fresh_policy("learned", base=None, seed=0, nuisance=0.0, init_std=0.5)
    assert measured == {}
    assert pretrain_tower(policy, steps=40, seed=0, log=lambda line: None) > 0.5  # chance ≈ 1 / 48


def test_every_image_source_trains_and_is_scored(tmp_path, default_size_policy):
    base = tmp_path / "base"
    default_size_policy.save_pretrained(base)
    runs = [(source, "count") for source in VISION_SOURCES] + [("learned", q) for q in QUESTIONS if q != "count"]
    for source, question in runs:
        out = tmp_path / f"{source}-{question}.json"
        result = main(
            ["--vision", source, "--question", question, "--base", str(base), "--steps", "2", "--eval-every", "1"]
            + ["--eval-items", "8", "--max-new-tokens", "4", "--tower-steps", "2", "--out", str(out)]
        )
        assert result["question"] == question
        assert [row["step"] for row in result["scores"]] == [1, 2]
        last = result["scores"][-1]
        assert 0.0 <= last["exact"] <= 1.0 and np.isfinite(last["loss"])
        zero = last["zero_vs_absent"]
        assert sum(total for _, total in zero["groups"]) == 8 and 0.0 <= zero["value"] <= 1.0
        assert json.loads(out.read_text()) == result
        assert list(result["vision_measured"]) == (["tower_patch_accuracy"] if source == "pretrained" else [])


def test_frozen_sources_need_a_base_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="--vision frozen needs a base model folder"):
        main(["--vision", "frozen", "--base", str(tmp_path / "missing"), "--steps", "1"])


def test_token_geometry_reports_norms_and_symmetric_cosines(default_size_policy):
    samples = list(itertools.islice(colour_questions("retained/count", 0), 40))
    geometry = token_geometry(default_size_policy, samples)
    groups = ["background", "red", "green", "blue", "yellow"]
    assert list(geometry["cosines"]) == groups and geometry["norms"]["objects"] > 0
    assert geometry["cosines"]["background"]["background"] == pytest.approx(1.0)  # every background token alike
    for a, b in itertools.product(groups, groups):
        assert geometry["cosines"][a][b] == pytest.approx(geometry["cosines"][b][a])
    assert list(geometry["probes"]) == groups[1:] and all(0.0 <= v <= 1.0 for v in geometry["probes"].values())
