"""Padding helpers for varlen attention, with flash_attn.bert_padding's names, signatures
and return values (FlashAttention 2.6+/2.7): turn a padded (batch, seqlen, ...) batch plus
a key-padding mask into packed tokens with cu_seqlens, and back.

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)
    out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens,
                                 max_seqlen, max_seqlen, causal=True)
    out = pad_input(out, indices, batch, seqlen)        # zeros at padded positions

All functions are differentiable (gathers/scatters on the first axis) and run on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "index_first_axis",
    "index_put_first_axis",
    "unpad_input",
    "pad_input",
    "unpad_input_for_concatenated_sequences",
]


def _check_indices(indices, name="indices"):
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64) \
            or indices.ndim != 1:
        got = (f"{indices.dtype} of shape {tuple(indices.shape)}"
               if isinstance(indices, torch.Tensor) else type(indices).__name__)
        raise TypeError(f"{name} must be a 1-D integer tensor of row indices, got {got}")


def index_first_axis(input, indices):
    """input[indices] along the first axis: (first_axis, ...) -> (len(indices), ...)."""
    _check_indices(indices)
    return input.index_select(0, indices)


def index_put_first_axis(values, indices, first_axis_dim: int):
    """The inverse gather: a (first_axis_dim, ...) tensor of zeros with values at rows
    `indices` (out-of-place, differentiable w.r.t. values)."""
    _check_indices(indices)
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"values has {values.shape[0]} rows but indices has "
                         f"{indices.shape[0]} entries")
    out = values.new_zeros((first_axis_dim,) + tuple(values.shape[1:]))
    return out.index_copy(0, indices.long(), values)


def _check_mask(mask, name, hidden_states):
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a (batch, seqlen) tensor (1 = token, 0 = padding), "
                         f"got {got}")
    if tuple(hidden_states.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"hidden_states starts with (batch, seqlen) = "
                         f"{tuple(hidden_states.shape[:2])} but {name} has shape "
                         f"{tuple(mask.shape)}")


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """hidden_states (batch, seqlen, ...), attention_mask (batch, seqlen) bool/int with 1 for
    tokens. unused_mask (optional, same shape): tokens that are allocated but not attended
    to (they are packed too, counted in cu_seqlens but not in seqused).

    Returns (hidden_states_unpad (total, ...), indices (total,) int64 into the flattened
    batch * seqlen rows, cu_seqlens (batch + 1,) int32, max_seqlen_in_batch int,
    seqused (batch,) int32 = attention_mask's per-row counts)."""
    _check_mask(attention_mask, "attention_mask", hidden_states)
    all_masks = attention_mask.bool()
    if unused_mask is not None:
        _check_mask(unused_mask, "unused_mask", hidden_states)
        all_masks = all_masks | unused_mask.bool()
    seqlens = all_masks.sum(-1, dtype=torch.int32)
    seqused = attention_mask.bool().sum(-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape((-1,) + tuple(hidden_states.shape[2:]))
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states, indices, batch: int, seqlen: int):
    """hidden_states (total, ...) from unpad_input -> (batch, seqlen, ...), zeros at the
    padded positions."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view((batch, seqlen) + tuple(hidden_states.shape[1:]))


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Packing where each batch row already holds several sequences back to back:
    attention_mask_in_length (batch, seqlen) lists each row's sequence lengths, then zeros
    (e.g. [[2, 3, 0, 0, 0], [5, 0, 0, 0, 0]]: row 0 holds sequences of 2 and 3 tokens).
    Returns (hidden_states_unpad, indices, cu_seqlens (num_sequences + 1,) int32,
    max_seqlen_in_batch) with one cu_seqlens entry per sequence."""
    _check_mask(attention_mask_in_length, "attention_mask_in_length", hidden_states)
    lens = attention_mask_in_length.to(torch.int64)
    seqlen = lens.shape[1]
    used = lens.sum(-1)  # tokens per row, at its start
    valid = torch.arange(seqlen, device=lens.device).view(1, -1) < used.view(-1, 1)
    indices = torch.nonzero(valid.flatten(), as_tuple=False).flatten()
    seqlens = lens.flatten()
    seqlens = seqlens[seqlens > 0].to(torch.int32)
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape((-1,) + tuple(hidden_states.shape[2:]))
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen
