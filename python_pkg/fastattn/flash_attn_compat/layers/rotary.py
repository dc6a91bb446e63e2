"""flash_attn.layers.rotary's functional rotary embedding, in plain torch (any device,
differentiable through autograd).

    # from flash_attn.layers.rotary import apply_rotary_emb
    from fastattn.flash_attn_compat.layers.rotary import apply_rotary_emb

The first rotary_dim = 2 * cos.shape[1] channels of every head are rotated by the angle
table row of the token's position; the remaining channels pass through unchanged.
interleaved=False pairs channel i with i + rotary_dim / 2 (GPT-NeoX), interleaved=True
pairs channels 2i and 2i + 1 (GPT-J). The products are taken in float32 and the result is
cast back to x's dtype. As in FlashAttention's kernel, a position past the end of the
table (>= seqlen_ro) is left unrotated.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["apply_rotary_emb", "rotate_at"]


def rotate_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              interleaved: bool) -> torch.Tensor:
    """x (..., nheads, headdim) rotated at integer `positions` (x.shape[:-2]) of the tables
    cos / sin (seqlen_ro, rotary_dim / 2); returns a new tensor of x's dtype."""
    half = cos.shape[1]
    rd = 2 * half
    seqlen_ro = cos.shape[0]
    positions = positions.to(device=x.device, dtype=torch.long)
    inside = (positions >= 0) & (positions < seqlen_ro)
    idx = torch.where(inside, positions, torch.zeros_like(positions))
    c = torch.where(inside.unsqueeze(-1), cos.float()[idx], 1.0).unsqueeze(-2)
    s = torch.where(inside.unsqueeze(-1), sin.float()[idx], 0.0).unsqueeze(-2)
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def _offsets(seqlen_offsets, batch: int, device) -> torch.Tensor:
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.ndim == 0:
            return seqlen_offsets.to(device=device, dtype=torch.long).expand(batch)
        if tuple(seqlen_offsets.shape) != (batch,) or seqlen_offsets.dtype not in (
                torch.int32, torch.int64):
            raise ValueError(f"seqlen_offsets must be an int or an int32/int64 tensor of shape "
                             f"(batch,) = ({batch},), got {seqlen_offsets.dtype} "
                             f"{tuple(seqlen_offsets.shape)}")
        return seqlen_offsets.to(device=device, dtype=torch.long)
    try:
        if isinstance(seqlen_offsets, bool):
            raise TypeError
        off = operator.index(seqlen_offsets)
    except TypeError:
        raise TypeError(f"seqlen_offsets must be an int or a (batch,) int tensor, got "
                        f"{type(seqlen_offsets).__name__}") from None
    return torch.full((batch,), off, dtype=torch.long, device=device)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                     cu_seqlens=None, max_seqlen=None):
    """x (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with
    cu_seqlens (batch + 1,) int32 and max_seqlen; cos / sin (seqlen_ro, rotary_dim / 2) with
    rotary_dim <= headdim; seqlen_offsets an int or (batch,) int tensor: token t of sequence
    b sits at position seqlen_offsets[b] + t. Returns the rotated x (x itself, modified,
    with inplace=True)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ValueError(f"{name} must be a 2-D tensor (seqlen_ro, rotary_dim / 2)")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if 2 * cos.shape[1] > x.shape[-1]:
        raise ValueError(f"rotary_dim = 2 * cos.shape[1] = {2 * cos.shape[1]} must be <= "
                         f"headdim = {x.shape[-1]}")
    if cu_seqlens is None:
        if x.ndim != 4:
            raise ValueError(f"x must be 4-D (batch, seqlen, nheads, headdim) without "
                             f"cu_seqlens, got shape {tuple(x.shape)}")
        B, S = x.shape[:2]
        off = _offsets(seqlen_offsets, B, x.device)
        positions = off.view(B, 1) + torch.arange(S, device=x.device).view(1, S)
    else:
        if x.ndim != 3:
            raise ValueError(f"x must be 3-D (total_seqlen, nheads, headdim) with cu_seqlens, "
                             f"got shape {tuple(x.shape)}")
        if max_seqlen is None:
            raise ValueError("max_seqlen must be given with cu_seqlens")
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        B = cu.numel() - 1
        off = _offsets(seqlen_offsets, B, x.device)
        seq = torch.repeat_interleave(torch.arange(B, device=x.device), cu.diff(),
                                      output_size=x.shape[0])
        positions = torch.arange(x.shape[0], device=x.device) - cu[seq] + off[seq]
    out = rotate_at(x, cos, sin, positions, bool(interleaved))
    if inplace:
        if x.requires_grad:
            x.copy_(out)  # autograd's own rules for in-place ops apply
        else:
            with torch.no_grad():
                x.copy_(out)
        return x
    return out
