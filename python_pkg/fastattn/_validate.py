"""Input checks for every public entry point. They run before any kernel and raise
ValueError/TypeError messages that name the argument, what was expected, what was given,
and how to fix it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_qkv(q, k, v, *, names=("q", "k", "v")) -> None:
    """q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), Hq % Hkv == 0."""
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq_len, head_dim), got {t.ndim}-D "
                f"with shape {tuple(t.shape)}; for (batch, seq_len, heads, head_dim) inputs "
                f"pass {name}.transpose(1, 2)"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                f"got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{qn}, {kn}, {vn} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            f"cast them with .to({q.dtype})"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: {qn} has {B}, {kn} has {k.shape[0]}, {vn} has {v.shape[0]}"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"{kn} and {vn} must have the same number of heads, got {k.shape[1]} and {v.shape[1]}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{kn} and {vn} must have the same sequence length, got {k.shape[2]} and {v.shape[2]}"
        )
    if k.shape[3] != D:
        raise ValueError(
            f"head dims differ: {qn} has {D}, {kn} has {k.shape[3]}; queries and keys must "
            f"share the head dim"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads ({Hq}) must be a multiple of the number of key/value "
            f"heads ({Hkv}) for grouped-query attention"
        )


def check_window(window, name: str = "window") -> tuple[int, int]:
    """A window as the user gives it -> (left, right) ints, each >= 0 or -1 (unbounded);
    None is (-1, -1). The one parser of the window vocabulary (masking.py has the rule)."""
    if window is None:
        return -1, -1
    if (not isinstance(window, Sequence) or isinstance(window, str) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1
                       for w in window)):
        raise ValueError(f"{name} must be a pair of ints (left, right), each >= 0 or -1 for "
                         f"unbounded, got {window!r}")
    return int(window[0]), int(window[1])


def normalize_window(window, causal: bool) -> tuple[int, int]:
    """The window of an attention call: check_window(window) with causal folded in as
    right <= 0 (bottom-right aligned)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = check_window(window)
    if causal:
        right = 0 if right == -1 else min(right, 0)
    return left, right


def validate_scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (-math.inf < scale < math.inf):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def validate_softcap(softcap) -> float:
    """softcap: None/0 (off) or a positive float; logits become softcap * tanh(s / softcap).
    (The public defaults are None, not 0.0: torch.compile traces float defaults symbolically.)"""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0.0 = off), got {type(softcap).__name__}")
    softcap = float(softcap)
    # comparisons, not math.isfinite: they trace under torch.compile(dynamic=True)
    if not (0.0 <= softcap < math.inf):
        raise ValueError(f"softcap must be a finite float >= 0 (0.0 = off), got {softcap}")
    return softcap


def validate_dropout(dropout_p, dropout_seed) -> tuple[float, int | None]:
    if dropout_p is None:
        dropout_p = 0
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}; pass 0.0 to disable "
                         f"dropout (e.g. at eval time)")
    if dropout_seed is not None and (isinstance(dropout_seed, bool)
                                     or not isinstance(dropout_seed, int)):
        raise TypeError(f"dropout_seed must be an int or None (None: drawn from torch's default "
                        f"generator), got {type(dropout_seed).__name__}")
    return dropout_p, dropout_seed


def validate_alibi_slopes(alibi_slopes, B: int, Hq: int, device) -> torch.Tensor | None:
    """Returns (B, Hq) contiguous float32 slopes on `device`, or None."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor of shape ({Hq},) or ({B}, {Hq}), "
                        f"or None, got {type(alibi_slopes).__name__}")
    if not alibi_slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be a floating tensor (float32), got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({Hq},) or (batch, nheads) = "
                         f"({B}, {Hq}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != torch.device(device):
        raise ValueError(f"alibi_slopes must be on the inputs' device {device}, got "
                         f"{alibi_slopes.device}")
    s = alibi_slopes.detach().to(torch.float32)
    return s.expand(B, Hq).contiguous()


def _accepted_mask_shapes(target: tuple) -> str:
    """'(L, S), (H, L, S) or (B, H, L, S)' spelled with the call's sizes."""
    names = {2: ["L", "S"], 3: ["N", "L", "S"], 4: ["B", "H", "L", "S"]}
    n = len(target)
    dims = names.get(n, [f"d{i}" for i in range(n - 2)] + ["L", "S"])
    forms = []
    for k in range(2, n + 1):
        forms.append("(" + ", ".join(f"{d}={s}" for d, s in zip(dims[n - k:], target[n - k:]))
                     + ")")
    return forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + " or " + forms[-1]


def validate_attn_mask(attn_mask, query, key, *, name: str = "attn_mask") -> None:
    """torch SDPA's attn_mask rule, checked up front: None, or a tensor that is bool (True =
    take part in attention) or floating (added to the scores) in float32 or the query's
    dtype, with 2 to query.ndim dims that broadcast to (*query.shape[:-2], L, S) without
    growing it (each dim equal to the target's or 1), on the query's device. These are
    exactly the masks torch's own function accepts (and a mask on another device, which
    torch either rejects or mishandles). Inputs torch rejects for other reasons (non-tensor
    or < 2-D query/key, nested tensors) are left to torch's own errors."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or None (bool: True = take part in attention; or "
            f"float: added to the attention scores), got {type(attn_mask).__name__}")
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)) \
            or query.ndim < 2 or key.ndim < 2 \
            or query.is_nested or key.is_nested or attn_mask.is_nested:
        return
    L, S = query.shape[-2], key.shape[-2]
    bias_cls = getattr(getattr(torch.nn, "attention", None), "bias", None)
    if bias_cls is not None and isinstance(attn_mask, bias_cls.CausalBias):
        # torch's causal_upper_left / causal_lower_right(L, S): a tensor subclass whose
        # .shape is not its (L, S); torch checks nothing else about it.
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
            raise ValueError(
                f"{name} is a causal bias built for (L, S) = ({attn_mask.seq_len_q}, "
                f"{attn_mask.seq_len_kv}) but query.shape[-2] = {L} and key.shape[-2] = {S}; "
                f"build it with causal_lower_right({L}, {S}) / causal_upper_left({L}, {S})")
        return
    qdt = query.dtype
    if attn_mask.dtype not in (torch.bool, torch.float32, qdt):
        allowed = ("bool or float32" if qdt == torch.float32
                   else f"bool, float32 or the query's dtype ({qdt})")
        raise TypeError(
            f"{name} must be a {allowed} tensor (bool: True = take part in attention; float: "
            f"added to the scores), got {attn_mask.dtype}; convert it with {name}.to({qdt}) or "
            f"build a bool mask")
    target = (*query.shape[:-2], L, S)
    shape = tuple(attn_mask.shape)
    ok = 2 <= len(shape) <= len(target) and all(
        m == t or m == 1 for m, t in zip(reversed(shape), reversed(target)))
    if not ok:
        raise ValueError(
            f"{name} must broadcast to {target} (*query.shape[:-2], L = query.shape[-2], "
            f"S = key.shape[-2]): accepted shapes are {_accepted_mask_shapes(target)}, where "
            f"any dim may be 1; got {name} of shape {shape}")
    if attn_mask.device != query.device:
        raise ValueError(
            f"{name} must be on the query's device {query.device}, got {attn_mask.device}; move "
            f"it with {name}.to(query.device)")


def validate_mask_device(mask, device, *, name: str, owner: str = "query") -> None:
    """A mask tensor must live where the attention runs (the {owner}'s device)."""
    if isinstance(mask, torch.Tensor) and mask.device != torch.device(device):
        raise ValueError(f"{name} must be on the {owner}'s device {device}, got {mask.device}; "
                         f"move it with {name}.to({owner}.device)")
