"""sdpa: torch.nn.functional.scaled_dot_product_attention, the peer fastattn is measured
against. Bottom-right causal, windows and block masks become an explicit boolean
attn_mask (so torch picks its masked path); GQA goes through enable_gqa."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masking import window_mask
from .base import Backend, Problem


def _torch_sdpa():
    return getattr(F.scaled_dot_product_attention, "__fastattn_original__",
                   F.scaled_dot_product_attention)


class SDPABackend(Backend):
    name = "sdpa"
    priority = 10
    devices = ("cpu", "cuda")
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    min_head_dim = 0
    max_head_dim = 1 << 30
    supports_window = True
    supports_block_mask = True
    supports_backward = True
    supports_lse = False  # torch does not return the log-sum-exp publicly

    def forward(self, q, k, v, p: Problem):
        sdpa = _torch_sdpa()
        gqa = p.Hq != p.Hkv
        if not p.is_masked:
            return sdpa(q, k, v, scale=p.scale, enable_gqa=gqa), None
        # torch's is_causal is top-left: the bottom-right window (-1, Nq - Nk) when Nq >= Nk
        if p.block_mask is None and p.window == (-1, p.Nq - p.Nk) and p.Nq >= p.Nk:
            return sdpa(q, k, v, is_causal=True, scale=p.scale, enable_gqa=gqa), None
        mask = None
        if p.window != (-1, -1):
            mask = window_mask(p.Nq, p.Nk, *p.window, device=q.device)
        if p.block_mask is not None:
            bm = p.block_mask.to_dense()
            mask = bm if mask is None else mask & bm
        out = sdpa(q, k, v, attn_mask=mask, scale=p.scale, enable_gqa=gqa)
        # Contract: a row with no visible key gives 0 (torch may give NaN there).
        empty = ~mask.any(dim=-1, keepdim=True)
        if bool(empty.any()):
            out = out.masked_fill(empty, 0.0)
        return out, None
