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
