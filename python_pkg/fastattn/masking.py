"""The token-level masking rule shared by every backend and by fastattn.sparse.

Positions are bottom-right aligned: with offset = Nk - Nq, query i sits on key diagonal
i + offset. Query i may see key j iff

    (left  == -1 or j >= i + offset - left) and
    (right == -1 or j <= i + offset + right)

causal is (left, right) = (-1, 0).
"""

from __future__ import annotations

import torch


def window_visible(q_idx: torch.Tensor, kv_idx: torch.Tensor, Nq: int, Nk: int,
                   left: int, right: int) -> torch.Tensor:
    """Elementwise rule on broadcastable index tensors."""
    d = kv_idx - (q_idx + (Nk - Nq))  # key position relative to the query's diagonal
    ok = torch.ones_like(d, dtype=torch.bool)
    if left != -1:
        ok = ok & (d >= -left)
    if right != -1:
        ok = ok & (d <= right)
    return ok


def window_mask(Nq: int, Nk: int, left: int, right: int, device=None) -> torch.Tensor:
    """Dense (Nq, Nk) bool mask of the rule, True = visible."""
    i = torch.arange(Nq, device=device).unsqueeze(1)
    j = torch.arange(Nk, device=device).unsqueeze(0)
    return window_visible(i, j, Nq, Nk, left, right)


def decode_mask(cache_seqlens, B: int, Nq: int, Ncache: int, window_left: int = -1,
                device=None, window_right: int = 0) -> torch.Tensor:
    """(B, 1, Nq, Ncache) bool mask of decode attention (True = visible): the same rule with
    each batch row's own key length L_b = cache_seqlens[b] (default Ncache), so query i sits
    at position L_b - Nq + i, and keys j >= L_b are never seen."""
    L = (torch.full((B,), Ncache, device=device) if cache_seqlens is None
         else cache_seqlens.to(device=device, dtype=torch.long))
    i = torch.arange(Nq, device=device).view(1, Nq, 1)
    j = torch.arange(Ncache, device=device).view(1, 1, Ncache)
    diag = L.view(B, 1, 1) - Nq + i  # each query's own position
    ok = j < L.view(B, 1, 1)
    if window_right != -1:
        ok = ok & (j <= diag + window_right)
    if window_left != -1:
        ok = ok & (j >= diag - window_left)
    return ok.unsqueeze(1)
