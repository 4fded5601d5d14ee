"""The optimisation engine: a DeepSpeed ZeRO engine around the policy (or plain torch when DeepSpeed is off).

Works in one process (a single-rank gloo group is created when none exists) and inside Ray Train workers, where
TorchTrainer has already initialised the process group. Torch's fused AdamW is passed to DeepSpeed, so that no
fused-Adam extension is JIT-built. Never imports Ray.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from visurf_ray.config import DeepSpeedConfig, OptimConfig
from visurf_ray.locks import exclusive_lock
from visurf_ray.train.schedules import StagedSchedule
from visurf_ray.validation import ValidationError

DEEPSPEED_TAG = "engine"
"""`Engine.save`'s DeepSpeed checkpoint tag: the subfolder of the checkpoint folder DeepSpeed writes into."""
DEEPSPEED_MODEL_STATES = Path(DEEPSPEED_TAG) / "mp_rank_00_model_states.pt"
"""The file of DeepSpeed's checkpoint (ZeRO stages 0-2) that holds the module weights."""
TORCH_ENGINE_FILE = "engine.pt"
"""`Engine.save`'s file when DeepSpeed is off: {"module", "optimizer", "scheduler"} state dicts."""


def ensure_process_group() -> None:
    """Create a single-rank group on 127.0.0.1 (nccl with CUDA, else gloo) when no torch.distributed group exists
    (in-process runs)."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if dist.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def use_bf16(ds: DeepSpeedConfig) -> bool:
    return ds.bf16 == "true" or (ds.bf16 == "auto" and torch.cuda.is_available())


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON: `optim.micro_batches` backward passes per optimizer step, each loss already weighted by
    its share of the batch (so DeepSpeed must not divide it again). micro_batch: sequences per micro-batch (nominal)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.micro_batches,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": {
            "stage": ds.zero_stage,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.reduce_bucket_size,
            "overlap_comm": torch.cuda.is_available(),
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": use_bf16(ds)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass
class Engine:
    """What the step function needs: the trainable module, backward per micro-batch, step, and checkpoint I/O.

    Per optimizer step the caller makes exactly `optim.micro_batches` `backward` calls, then one `step`."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    deepspeed_engine: Any | None
    max_grad_norm: float

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed_engine is not None:
            self.deepspeed_engine.backward(loss, scale_wrt_gas=False)
            self.deepspeed_engine.step()  # updates only at the accumulation boundary (the last micro-batch)
        else:
            loss.backward()

    def step(self) -> float:
        """Clip, step the optimizer and the LR schedule, zero grads; returns the pre-clip global grad norm."""
        if self.deepspeed_engine is not None:
            norm = self.deepspeed_engine.get_global_grad_norm()
        else:
            if dist.is_initialized() and dist.get_world_size() > 1:
                for param in self.module.parameters():
                    if param.grad is not None:
                        dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW that holds the moments (DeepSpeed's ZeRO optimizers wrap it as `.optimizer`)."""
        optimizer = self.optimizer
        while not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        return optimizer

    def reset_optimizer_state(self) -> None:
        """Forget AdamW's moments and step counts (at a new stage): the next step starts them afresh, as a new
        optimizer on the same weights would. The LR schedule's stages are set in `build_engine`."""
        self.torch_optimizer().state.clear()

    def save(self, folder: Path) -> None:
        """Write engine state (weights, optimizer, schedule) into `folder` (every rank calls this): DeepSpeed's
        checkpoint under the tag DEEPSPEED_TAG, or TORCH_ENGINE_FILE when DeepSpeed is off."""
        if self.deepspeed_engine is not None:
            self.deepspeed_engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        elif not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(
                {
                    "module": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                folder / TORCH_ENGINE_FILE,
            )

    def load(self, folder: Path) -> None:
        if self.deepspeed_engine is not None:
            path, _ = self.deepspeed_engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed engine state under {folder}")
        else:
            state = torch.load(folder / TORCH_ENGINE_FILE, map_location="cpu", weights_only=False)
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


def load_saved_weights(module: torch.nn.Module, folder: str | Path) -> None:
    """Load the module weights that `Engine.save` wrote into `folder` into `module`, in its dtype, without an engine:
    DeepSpeed's DEEPSPEED_MODEL_STATES (the module state under "module"; with bf16 training these are the bf16 module
    weights, not the fp32 master copy) or TORCH_ENGINE_FILE. ZeRO-3 checkpoints (partitioned weights) are refused."""
    folder = Path(folder)
    files = [folder / name for name in (DEEPSPEED_MODEL_STATES, TORCH_ENGINE_FILE) if (folder / name).is_file()]
    if not files:
        raise ValidationError(f"checkpoint {folder} holds neither {DEEPSPEED_MODEL_STATES} nor {TORCH_ENGINE_FILE}")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "module" not in state:
        raise ValidationError(f"{files[0]} has no 'module' state dict")
    try:
        module.load_state_dict(state["module"])
    except RuntimeError as error:
        raise ValidationError(f"{files[0]} does not match the module (a ZeRO-3 checkpoint?): {error}") from error


def load_cpu_communication_op() -> None:
    """Build (first time on a machine) and load DeepSpeed's JIT extension for CPU collectives (`ShareMemCommBuilder`,
    which `deepspeed.initialize` loads on CPU; loaded ops are cached per process, so it then reuses this one) under an
    flock. torch's own build lock is a file that exists while a build or load runs (`FileBaton`): a process killed in
    between (a Ctrl-C during a fresh machine's first trials) leaves it behind and every later build waits on it
    forever. Under the flock no other process is building or loading it, so such a file is stale and removed first."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not __compatible_ops__.get(builder.NAME, False):  # deepspeed.initialize skips it too
        return
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with exclusive_lock(build_dir.parent / f"{builder.name}.flock"):
        (build_dir / "lock").unlink(missing_ok=True)
        builder.load(verbose=False)


def build_engine(
    model: torch.nn.Module,
    optim: OptimConfig,
    ds: DeepSpeedConfig,
    *,
    total_steps: int,
    micro_batch: int,
    stage_starts: tuple[int, ...] = (0,),
) -> Engine:
    """Wrap `model` for training: DeepSpeed ZeRO (`ds.zero_stage`) with a torch AdamW, or plain torch.

    micro_batch: sequences per backward pass on this worker (DeepSpeed's nominal micro-batch size). stage_starts: the
    steps where a training stage begins (`StagedSchedule`; the caller resets the optimizer state there).
    """
    ensure_process_group()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: its sqrt rounds alike on every CPU (visurf_ray.numerics)
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, StagedSchedule(total_steps, optim.warmup_steps, tuple(stage_starts), optim.schedule)
    )
    if not ds.enabled:
        return Engine(model, optimizer, scheduler, None, optim.max_grad_norm)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        load_cpu_communication_op()
    ds_engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(ds, optim, micro_batch),
    )
    return Engine(ds_engine.module, ds_optimizer, ds_scheduler, ds_engine, optim.max_grad_norm)
