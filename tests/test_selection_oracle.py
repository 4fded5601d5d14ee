"""Tests of the selection experiment (experiments/selection_oracle.py): the oracle code reads each image token's
colours from its pixels exactly as the scene places the objects; the oracle's tokens are what it says; every image
source trains and is scored; the token geometry and probes are reported by colour."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from experiments.selection_oracle import (
    VISION_SOURCES,
    OracleVision,
    colour_questions,
    main,
    token_colours,
    token_geometry,
)
from visurf_ray.data.benchmark import COLOURS, empty_image
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


@pytest.fixture(scope="module")
def default_size_policy():
    from visurf_ray.data.benchmark import text_corpus

    return build_tiny_vlm(text_corpus(seed=0, n=200), seed=0)


def test_the_oracle_embeds_colours_zeroes_the_background_and_adds_the_shared_direction(default_size_policy):
    policy = default_size_policy
    sample = next(s for s in colour_questions("pretrain/count", 0) if s.meta["scene"])
    prompts = encode_prompts(policy, [sample.image, empty_image()], [sample.problem] * 2)
    processor = policy.processor.image_processor
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


def test_every_image_source_trains_and_is_scored(tmp_path, default_size_policy):
    base = tmp_path / "base"
    default_size_policy.save_pretrained(base)
    for source in VISION_SOURCES:
        out = tmp_path / f"{source}.json"
        result = main(
            ["--vision", source, "--base", str(base), "--steps", "2", "--eval-every", "1", "--eval-items", "8"]
            + ["--max-new-tokens", "4", "--out", str(out)]
        )
        assert [row["step"] for row in result["scores"]] == [1, 2]
        last = result["scores"][-1]
        assert 0.0 <= last["exact"] <= 1.0 and np.isfinite(last["loss"])
        zero = last["zero_vs_absent"]
        assert sum(total for _, total in zero["groups"]) == 8 and 0.0 <= zero["value"] <= 1.0
        assert json.loads(out.read_text()) == result


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
