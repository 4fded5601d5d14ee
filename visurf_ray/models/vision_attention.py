"""Qwen2.5-VL's windowed vision attention with its windows batched.

Without flash attention, transformers' `Qwen2_5_VLVisionAttention` runs one attention call per window (a Python loop
over `cu_seqlens`): for the tiny model's one-token windows that is ~1,000 calls per training step, and for a real
checkpoint one per 112-pixel window per block. `BatchedWindowVisionAttention` computes the same function with one
`scaled_dot_product_attention` call per distinct window length. Imports torch and transformers; never Ray.
"""

from typing import TypeVar

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
)

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class BatchedWindowVisionAttention(Qwen2_5_VLVisionAttention):
    """`Qwen2_5_VLVisionAttention` whose "sdpa" path batches the windows of equal length (same parameters, same
    outputs); other attention implementations (flash attention's varlen kernel, eager) run transformers' code."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.config._attn_implementation != "sdpa":
            return super().forward(
                hidden_states, cu_seqlens, position_embeddings=position_embeddings, max_seqlen=max_seqlen, **kwargs
            )
        if position_embeddings is None:
            raise ValueError("BatchedWindowVisionAttention needs the vision tower's position_embeddings (cos, sin)")
        seq_length = hidden_states.shape[0]
        query, key, value = (
            self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
        starts_by_length: dict[int, list[int]] = {}
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            if end > start:
                starts_by_length.setdefault(end - start, []).append(start)
        outputs, positions = [], []
        for length, starts in starts_by_length.items():
            offsets = torch.arange(length, device=query.device)
            index = (torch.tensor(starts, device=query.device)[:, None] + offsets).flatten()
            q, k, v = (  # [windows, heads, length, head_dim]
                states[index].unflatten(0, (len(starts), length)).transpose(1, 2) for states in (query, key, value)
            )
            attended = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
            outputs.append(attended.transpose(1, 2).flatten(0, 1))
            positions.append(index)
        attn_output = torch.cat(outputs)[torch.argsort(torch.cat(positions))] if len(outputs) > 1 else outputs[0]
        return self.proj(attn_output.reshape(seq_length, -1))


def batch_vision_windows(model: ModuleT) -> ModuleT:
    """Turn every Qwen2.5-VL vision attention of `model` (in place) into a `BatchedWindowVisionAttention`.

    Returns `model`. Parameters and state dict are unchanged."""
    for module in model.modules():
        if type(module) is Qwen2_5_VLVisionAttention:
            module.__class__ = BatchedWindowVisionAttention
    return model
