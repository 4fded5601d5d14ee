"""The tiny base model: SFT of the tiny Qwen2.5-VL on the benchmark's "pretrain" mix, its evaluation, and the cache
that builds it once per recipe.

The base model is the starting point of every paradigm comparison: the answer format always right, never an answer
it was not taught (`[]` for absent objects, "no defect"), and part of the boxes right. What made boxes learnable at
all (measured; see `TinyVLMSpec` and `visurf_ray.data.benchmark.BACKGROUND`): a background that the image processor
normalises to zero, per-token vision windows, a larger vision initialisation, and M-RoPE frequencies that give the
image tokens' rows and columns; the curriculum (1-object grounding first) then gets the column/row digits off
chance within ~200 steps instead of a plateau of ~1,300.
Imports torch and transformers (through `visurf_ray.models`); never Ray.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from visurf_ray.data.benchmark import (
    PRETRAIN,
    iter_split,
    make_split,
    make_stratified_split,
    split_slices,
    target_text,
    text_corpus,
)
from visurf_ray.data.sample import Sample
from visurf_ray.locks import exclusive_lock
from visurf_ray.models import (
    Policy,
    TinyVLMSpec,
    build_tiny_vlm,
    completion_logprobs,
    encode_prompts,
    encode_sequences,
    generate,
)
from visurf_ray.numerics import PINNED_CPU_NUMERICS
from visurf_ray.objectives import sft_loss
from visurf_ray.rewards import get_task, score
from visurf_ray.rewards.grounding import mask_overlap
from visurf_ray.train import schedules
from visurf_ray.train.evaluate import evaluate, greedy_answers
from visurf_ray.train.step import length_groups
from visurf_ray.validation import check_choice, check_int, check_number, check_type, require

RECIPE_VERSION = 7
"""Part of the cache key: bump it when the training code changes what a given PretrainConfig produces."""
DATA_FINGERPRINT_ITEMS = 256
"""Pretraining items whose content (question, pixels, target text) is part of the cache key: a change to the
benchmark's generators then builds a new base model instead of reusing one pretrained on other data."""

REPORT_FILE = "pretrain_report.json"
EVAL_SPLITS = {
    "grounding": "eval/grounding",
    "gui_point": "eval/gui_point",
    "anomaly": "eval/anomaly",
    "count": "retained/count",
}
"""Evaluation set name (scores `eval/<name>/<metric>`) -> benchmark split."""
ROLLOUT_SPLIT = "posttrain/grounding"


@functools.lru_cache(maxsize=8)
def pretraining_data_digest(seed: int) -> str:
    """16 hex digits of the first DATA_FINGERPRINT_ITEMS items of the "pretrain" split for `seed`: their content keys
    (`Sample.content_key`) and target texts."""
    digest = hashlib.sha256()
    for sample in itertools.islice(iter_split("pretrain", seed), DATA_FINGERPRINT_ITEMS):
        digest.update(f"{sample.content_key()}|{target_text(sample)}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CurriculumStage:
    """`steps` pretraining steps drawing only items of `kinds` (kinds of the "pretrain" mix) that show at most
    `max_objects` objects (`meta["objects"]`; items of kinds that do not count objects always pass)."""

    steps: int
    kinds: tuple[str, ...]
    max_objects: int = 9

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds))
        check_int("CurriculumStage.steps", self.steps, low=1)
        check_int("CurriculumStage.max_objects", self.max_objects, low=1)
        unknown = [kind for kind in self.kinds if kind not in PRETRAIN.kinds]
        require(
            self.kinds and not unknown,
            "CurriculumStage.kinds",
            f"must be non-empty kinds of the pretrain mix {sorted(PRETRAIN.kinds)}, got unknown {unknown}",
        )

    def admits(self, meta: Mapping) -> bool:
        """Whether an item with this `Sample.meta` belongs to the stage."""
        return meta["kind"] in self.kinds and meta.get("objects", 1) <= self.max_objects


@dataclass(frozen=True)
class PretrainConfig:
    """The recipe of the tiny base model; equal configs give equal models (CPU, same thread count).

    Optimisation: `steps` AdamW updates of `batch_size` items each at peak learning rate `lr`, reached by linear
    warmup over `warmup_steps` and decayed by `schedule` (a name in `schedules.LR_SCHEDULES`) to `final_lr_ratio * lr`;
    gradients clipped to norm `grad_clip`. Curriculum: the stages of `curriculum` in order, each drawing only the
    items of its kinds (of the benchmark's "pretrain" mix) that show at most its `max_objects`; the steps after the
    last stage draw the whole mix. Each step's batch is split into at most
    `length_groups` micro-batches of similar completion length (less padding, same token-mean gradient).
    Evaluation: `eval_size` items per evaluation set, greedy, up to `eval_max_new_tokens` tokens; rollout groups of
    `rollout_samples` completions at temperature 1 on `rollout_prompts` posttrain grounding prompts.
    `corpus_size` texts train the tokenizer; `threads` is torch's intra-op thread count during pretraining.
    """

    seed: int = 0
    steps: int = 1100
    batch_size: int = 32
    lr: float = 4e-3
    warmup_steps: int = 30
    schedule: str = "cosine"
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    curriculum: tuple[CurriculumStage, ...] = (
        CurriculumStage(200, ("grounding_single",), max_objects=1),
        CurriculumStage(320, ("grounding_single", "grounding_multi")),
    )
    length_groups: int = 3
    spec: TinyVLMSpec = field(default_factory=TinyVLMSpec)
    corpus_size: int = 2000
    eval_size: int = 100
    eval_max_new_tokens: int = 128
    rollout_prompts: int = 16
    rollout_samples: int = 8
    threads: int = 2

    def __post_init__(self):
        positive = (
            "steps",
            "batch_size",
            "length_groups",
            "corpus_size",
            "eval_size",
            "eval_max_new_tokens",
            "rollout_prompts",
            "rollout_samples",
            "threads",
        )
        for name in positive:
            check_int(f"PretrainConfig.{name}", getattr(self, name), low=1)
        for name in ("seed", "warmup_steps"):
            check_int(f"PretrainConfig.{name}", getattr(self, name), low=0)
        check_number("PretrainConfig.lr", self.lr, low=0, low_open=True, finite=False)
        check_number("PretrainConfig.grad_clip", self.grad_clip, low=0, low_open=True, finite=False)
        check_number("PretrainConfig.weight_decay", self.weight_decay, low=0, finite=False)
        check_number("PretrainConfig.final_lr_ratio", self.final_lr_ratio, low=0, high=1)
        check_choice("PretrainConfig.schedule", self.schedule, sorted(schedules.LR_SCHEDULES))
        check_type("PretrainConfig.spec", self.spec, TinyVLMSpec, "a TinyVLMSpec")
        object.__setattr__(self, "curriculum", tuple(self.curriculum))
        for index, stage in enumerate(self.curriculum):
            check_type(f"PretrainConfig.curriculum[{index}]", stage, CurriculumStage, "a CurriculumStage")

    def key(self) -> str:
        """12 hex digits identifying this recipe (every field, RECIPE_VERSION and `pretraining_data_digest`): the
        cache folder's suffix."""
        recipe = {"recipe_version": RECIPE_VERSION, "data": pretraining_data_digest(self.seed), **asdict(self)}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def lr_at(self, step: int) -> float:
        """Learning rate of update `step` (0-based): linear warmup to `lr`, then `schedule` down to the final ratio
        at the last step (`visurf_ray.train.schedules.lr_at`)."""
        return schedules.lr_at(
            step,
            peak=self.lr,
            warmup=self.warmup_steps,
            decay_end=self.steps - 1,
            shape=self.schedule,
            final_ratio=self.final_lr_ratio,
        )


def training_batches(cfg: PretrainConfig) -> Iterator[list[Sample]]:
    """`cfg.steps` batches of `cfg.batch_size` items of `iter_split("pretrain", cfg.seed)`, in stream order; during
    each stage of `cfg.curriculum` the stream skips the items its stage does not admit (they are not used later)."""
    stage_ends = list(itertools.accumulate(stage.steps for stage in cfg.curriculum))
    stage = None
    # the filter reads `stage` as each item is drawn, i.e. the stage of the step being filled (no look-ahead)
    stream = iter_split("pretrain", cfg.seed, where=lambda meta: stage is None or stage.admits(meta))
    for step in range(cfg.steps):
        stage = next((s for s, end in zip(cfg.curriculum, stage_ends) if step < end), None)
        yield list(itertools.islice(stream, cfg.batch_size))


def target_ids(policy: Policy, sample: Sample) -> list[int]:
    """Token ids of `target_text(sample)` followed by the eos token `<|im_end|>`."""
    tokenizer = policy.tokenizer
    return tokenizer(target_text(sample), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def sft_update(
    policy: Policy, optimizer: torch.optim.Optimizer, batch: list[Sample], *, groups: int, grad_clip: float
) -> float:
    """One SFT step on `batch`: token-mean NLL of the targets (+ eos) over the whole batch, accumulated over
    length-grouped micro-batches, gradient clipped to norm `grad_clip`, then `optimizer.step()`.

    Returns the batch's loss in nats per target token.
    """
    ids = [target_ids(policy, sample) for sample in batch]
    total_tokens = sum(len(target) for target in ids)
    optimizer.zero_grad(set_to_none=True)
    loss_value = 0.0
    for group in length_groups([len(target) for target in ids], max_groups=groups, min_saving=0.0):
        prompts = encode_prompts(policy, [batch[i].image for i in group], [batch[i].problem for i in group])
        sequences = encode_sequences(policy, prompts, [ids[i] for i in group], list(range(len(group))))
        logp, mask = completion_logprobs(policy.model, sequences.to(policy.device))
        group_tokens = sum(len(ids[i]) for i in group)
        loss = sft_loss(logp, mask.bool(), agg="token-mean") * (group_tokens / total_tokens)
        loss.backward()
        loss_value += loss.item()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
    optimizer.step()
    return loss_value


def untrained_policy(cfg: PretrainConfig, device: str | torch.device = "cpu") -> Policy:
    """`cfg`'s tiny VLM before pretraining, on `device` in train mode: its tokenizer trained on
    `text_corpus(cfg.seed, cfg.corpus_size)`, its weights drawn from `cfg.seed`."""
    policy = build_tiny_vlm(text_corpus(cfg.seed, cfg.corpus_size), cfg.spec, seed=cfg.seed)
    policy.model.to(device)  # type: ignore[arg-type]
    policy.model.train()
    return policy


def train_base(
    cfg: PretrainConfig,
    *,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    log_every: int = 100,
) -> Policy:
    """Build the tiny VLM (`untrained_policy`) and SFT it for `cfg.steps` steps.

    device: where the model trains, in float32 (the cached base models are CPU-trained; a CUDA run is reproducible
    only up to its kernels' nondeterminism). Logs the mean loss (nats per target token), learning rate and elapsed
    seconds every `log_every` steps. Runs with `cfg.threads` torch threads and restores the previous count
    afterwards. Returns the policy in eval mode, on `device`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        policy = untrained_policy(cfg, device)
        model = policy.model
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr_at(0),
            weight_decay=cfg.weight_decay,
            fused=True,  # visurf_ray.numerics
        )
        start, losses = time.perf_counter(), []
        for step, batch in enumerate(training_batches(cfg)):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            losses.append(sft_update(policy, optimizer, batch, groups=cfg.length_groups, grad_clip=cfg.grad_clip))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"pretraining loss is {losses[-1]} at step {step}")
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                log(
                    f"step {step + 1}/{cfg.steps}  loss {sum(losses) / len(losses):.4f}  lr {cfg.lr_at(step):.2e}  "
                    f"{time.perf_counter() - start:.0f} s"
                )
                losses = []
    finally:
        torch.set_num_threads(threads)
    policy.model.eval()
    return policy


def grounding_iou50(policy: Policy, samples: list[Sample], max_new_tokens: int) -> float:
    """Share of grounding `samples` whose greedy answer's box mask has IoU > 0.5 with the true boxes' (pixels)."""
    answers = greedy_answers(policy, samples, max_new_tokens)
    overlaps = [mask_overlap(a, s.solution, (s.img_width, s.img_height)) for a, s in zip(answers, samples)]
    return sum(overlap.iou > 0.5 for overlap in overlaps) / len(overlaps)


def rollout_group_outcomes(
    policy: Policy, samples: list[Sample], *, group_size: int, max_new_tokens: int, seed: int
) -> dict[str, float]:
    """Shares of prompts whose `group_size` completions sampled at temperature 1 all fail, all succeed, or mix.

    samples: prompts of one task; success is its verifier's `is_success`. Returns {"all_fail", "all_success",
    "mixed"} (fractions of prompts, summing to 1).
    """
    verifier = get_task(samples[0].task)
    prompts = encode_prompts(policy, [s.image for s in samples], [s.problem for s in samples])
    rollouts = generate(
        policy, prompts, num_return_sequences=group_size, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed
    )
    successes: list[list[bool]] = [[] for _ in samples]
    for text, row in zip(rollouts.texts, rollouts.prompt_index):
        sample = samples[row]
        components = score(sample.task, text, sample.solution, image_size=(sample.img_width, sample.img_height))
        successes[row].append(verifier.is_success(components))
    all_fail = sum(not any(group) for group in successes) / len(samples)
    all_success = sum(all(group) for group in successes) / len(samples)
    return {"all_fail": all_fail, "all_success": all_success, "mixed": 1.0 - all_fail - all_success}


def evaluate_base(policy: Policy, cfg: PretrainConfig) -> dict[str, float]:
    """The base model's scores (fractions in [0, 1] unless named otherwise):

    - `eval/<set>/<metric>` of `visurf_ray.train.evaluate.evaluate` on EVAL_SPLITS (`cfg.eval_size` items each,
      split evenly over the set's slices, seed 0; grounding only its "seen" slice: pretraining never shows purple, an
      absent object or an empty grounding image, so what the base model writes there is no competence measure)
      and on `no_object` (posttrain items asking for an absent object, among other objects or on an empty image);
    - `eval/grounding/iou50`: share of the first `cfg.eval_size` eval/grounding items with objects and only colours
      seen in pretraining whose greedy box mask has IoU > 0.5 (the competence target);
    - `eval/no_object/n_acc`, `eval/no_object/n_acc_empty_image`: share of `[]` answers on posttrain no-object items
      among other objects and on empty images (never taught: ~0);
    - `rollout/{mixed,all_fail,all_success}`: outcome shares of `cfg.rollout_samples` samples at temperature 1 on the
      first `cfg.rollout_prompts` posttrain grounding prompts (seed 0).
    """
    seen = iter_split(EVAL_SPLITS["grounding"], 0, where=lambda meta: meta["slice"] == "seen")
    eval_sets = {
        name: list(itertools.islice(seen, cfg.eval_size))
        if name == "grounding"
        else make_stratified_split(split, max(1, cfg.eval_size // len(split_slices(split))), 0)
        for name, split in EVAL_SPLITS.items()
    }
    no_object = (s for s in iter_split("posttrain/grounding", 0) if s.meta["no_object"])
    eval_sets["no_object"] = list(itertools.islice(no_object, cfg.eval_size))
    scores = evaluate(policy, eval_sets, cfg.eval_max_new_tokens).metrics
    seen_objects = (
        s for s in iter_split("eval/grounding", 0) if not s.meta["no_object"] and not s.meta["unseen_attribute"]
    )
    scores["eval/grounding/iou50"] = grounding_iou50(
        policy, list(itertools.islice(seen_objects, cfg.eval_size)), cfg.eval_max_new_tokens
    )
    outcomes = rollout_group_outcomes(
        policy,
        make_split(ROLLOUT_SPLIT, cfg.rollout_prompts, 0),
        group_size=cfg.rollout_samples,
        max_new_tokens=cfg.eval_max_new_tokens,
        seed=0,
    )
    scores.update({f"rollout/{name}": share for name, share in outcomes.items()})
    return scores


def pretrain_base(
    cfg: PretrainConfig,
    out_dir: Path,
    *,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Pretrain the tiny base model with `cfg` on `device` (see `train_base`), save it to `out_dir` and return its
    scores (see `evaluate_base`, run on the same device).

    `out_dir` receives the policy (`Policy.save_pretrained`, loadable with `load_policy`) and, last,
    `pretrain_report.json`: {"config", "recipe_version", "device", "numerics" (`numerics()` of the building machine),
    "weights_sha256" (`weights_sha256(out_dir)`), "train_seconds", "eval_seconds", "scores"}.
    """
    out_dir = Path(out_dir)
    start = time.perf_counter()
    policy = train_base(cfg, device=device, log=log)
    train_seconds = time.perf_counter() - start
    log(f"pretraining took {train_seconds:.0f} s; evaluating")
    start = time.perf_counter()
    scores = evaluate_base(policy, cfg)
    eval_seconds = time.perf_counter() - start
    policy.save_pretrained(out_dir)
    report = {
        "config": asdict(cfg),
        "recipe_version": RECIPE_VERSION,
        "device": str(policy.device),
        "numerics": numerics(),
        "weights_sha256": weights_sha256(out_dir),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "scores": scores,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return scores


def weights_sha256(folder: Path) -> str:
    """sha256 (hex) of the weight files in `folder` (every `*.safetensors` and `*.bin`, shards included, their bytes
    in name order): equal for bit-identical models. Read once per process while the files' sizes and modification
    times stay the same (a trial checks its checkpoint more than once)."""
    files = sorted(path for pattern in ("*.safetensors", "*.bin") for path in Path(folder).glob(pattern))
    require(files, f"policy folder {folder}", "has no weight files (*.safetensors, *.bin)")
    return _files_sha256(tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files))


@functools.lru_cache(maxsize=16)
def _files_sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as weights:
            for block in iter(lambda: weights.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def numerics() -> dict[str, str]:
    """What besides the recipe decides a CPU build's float rounding, and so its bits: torch's version, the instruction
    set of its CPU kernels (ATen's CPU capability), the kernel switches of `visurf_ray.numerics` as this process has
    them ("" = unset), the CPU model and the architecture. Builds of one recipe that differ in the first three may
    differ in every weight and in their scores (README, "Tiny base model")."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the first core's name, vendor, family and model (a VM's name may be generic)
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            cpu = (
                f"{fields['model name']} ({fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
                f"model {fields.get('model', '?')})"
            )
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{key: os.environ.get(key, "") for key in PINNED_CPU_NUMERICS},
        "cpu": cpu,
        "machine": platform.machine(),
    }


def default_cache_root() -> Path:
    """`$VISURF_CACHE`, else `~/.cache/visurf_ray`."""
    return Path(os.environ.get("VISURF_CACHE") or Path.home() / ".cache" / "visurf_ray")


def base_model_dir(cache_dir: Path | None = None, cfg: PretrainConfig = PretrainConfig()) -> Path:
    """Where the base model of `cfg` lives in the cache: `<cache root>/tiny-base-<cfg.key()>`."""
    return Path(cache_dir or default_cache_root()) / f"tiny-base-{cfg.key()}"


def ensure_base_model(
    cache_dir: Path | None = None,
    cfg: PretrainConfig = PretrainConfig(),
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """The folder of the pretrained base model for `cfg`, pretraining it first when it is not cached (or `force`).

    cache_dir: cache root (default `default_cache_root()`). Concurrent callers (processes or threads) serialise on
    an exclusive lock file beside the folder, so the model is built once; it is built in a temporary folder and
    renamed into place, so a killed build never leaves a folder that later loads (the next build of the same recipe
    removes its leftovers).
    """
    folder = base_model_dir(cache_dir, cfg)
    if folder.is_dir() and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.parent / f"{folder.name}.lock"):
        if folder.is_dir() and not force:
            return folder
        for leftover in folder.parent.glob(f".{folder.name}.building-*"):  # from builds killed while holding the lock
            shutil.rmtree(leftover)
        log(f"pretraining the tiny base model into {folder}")
        building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.building-"))
        building.chmod(0o755)  # mkdtemp's 0700 would hide the cached model from other users of a shared cache
        try:
            pretrain_base(cfg, building, log=log)
            if folder.is_dir():
                stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
                os.replace(folder, stale)
                shutil.rmtree(stale)
            os.replace(building, folder)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return folder
