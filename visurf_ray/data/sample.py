"""One prompt of any dataset: image, question text, canonical answer text and metadata.

Shared by the synthetic benchmark and the real-data loaders; the trainer and the models' input builders consume it.
Imports PIL only: never torch, ray or transformers.
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from PIL import Image

from visurf_ray.validation import require


@dataclass(frozen=True)
class Sample:
    """One item: an RGB image, the prompt text and the answer its task's verifier scores.

    id: unique within its split. task: a task name registered in `visurf_ray.rewards.TASKS`.
    image: RGB, `img_width` x `img_height` pixels. problem: the question shown to the model, including the
    output-format instruction. solution: the canonical answer text (what goes inside `<answer>…</answer>`), in the
    image's pixel coordinates. meta: facts about the item, e.g. {"no_object": True, "attribute": "purple"} (a private
    copy; treat it as read-only); benchmark items carry "think", the templated reasoning of pretraining targets.
    """

    id: str
    task: str
    image: Image.Image
    problem: str
    solution: str
    img_height: int
    img_width: int
    meta: Mapping = field(default_factory=dict)

    def __post_init__(self):
        require(
            self.image.size == (self.img_width, self.img_height),
            f"sample {self.id!r}:",
            f"image is {self.image.size[0]}x{self.image.size[1]} px but img_width x img_height is "
            f"{self.img_width}x{self.img_height}",
        )
        object.__setattr__(self, "meta", dict(self.meta))

    def content_key(self) -> str:
        """A digest of what the model is shown (the question and the image's pixels): items with equal keys are one
        item to a greedy evaluation, e.g. the offline benchmark's empty-image queries, which repeat 4 questions."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(self.problem.encode())
        digest.update(f"{self.image.mode} {self.image.size}".encode())
        digest.update(self.image.tobytes())
        return digest.hexdigest()
