"""What the benchmarks share: the trainer run one optimizer step at a time in this process (`StepRunner`), and a
randomly initialised tiny Qwen2.5-VL to run it on. Imported as `benchmarks.step_runner` by the scripts of this folder,
which put the repository root on sys.path.
"""

from __future__ import annotations

import resource
from pathlib import Path

from visurf_ray.config import ExperimentConfig


class StepRunner:
    """One paradigm's trainer in this process (`Trainer.from_config`, as `visurf_ray.train.loop.run_training` builds
    it, without evaluation or checkpoints) and its training prompts. `step(i)` runs optimizer step i on the loop's
    batch for step i (rank 0 of 1)."""

    def __init__(self, cfg: ExperimentConfig):
        import torch

        from visurf_ray.train.data import train_dataset
        from visurf_ray.train.trainer import Trainer

        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.trainer = Trainer.from_config(cfg)
        self.dataset = train_dataset(cfg)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainer.module.parameters())

    def step(self, step: int) -> dict[str, float]:
        """Metrics of the trainer's step plus `update_sequence_tokens`: the prompt and completion tokens (no padding)
        its forward and backward passes cover (each prompt once where its members share it)."""
        from visurf_ray.train.loop import batch_for_step, step_seed

        cfg = self.cfg
        samples = batch_for_step(self.dataset, step, cfg.data.prompts_per_step, 0, 1, cfg.seed)
        metrics = self.trainer.step(step, samples, step_seed(cfg.seed, step, 0))
        metrics["update_sequence_tokens"] = metrics["update_prompt_tokens"] + metrics["update_tokens"]
        return metrics

    def peak_memory_mib(self) -> float:
        """Peak allocated CUDA memory of the policy's device, else this process's peak RSS (MiB)."""
        import torch

        device = self.trainer.policy.device
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def random_tiny_model(folder: Path, seed: int) -> Path:
    """Save a randomly initialised tiny Qwen2.5-VL (TinyVLMSpec defaults) into `folder`."""
    from visurf_ray.data.benchmark import text_corpus
    from visurf_ray.models.tiny import TinyVLMSpec, build_tiny_vlm

    build_tiny_vlm(text_corpus(seed=seed), TinyVLMSpec(), seed=seed, out_dir=folder)
    return folder
