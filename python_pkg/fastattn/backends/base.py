"""What every backend shares: the description of one attention call (`Problem`) and the
`Backend` interface the dispatcher talks to.

A backend module defines one subclass of `Backend` and nothing that imports the public API
or the dispatcher. Backends see causal/window already folded into `window = (left, right)`
(bottom-right aligned, -1 = unbounded, causal == right <= 0), and when a block mask is
given, the window already intersected into it (`problem.window == (-1, -1)` then).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch

from ..kernel_mask import KernelMask, int64_seed


@dataclass(frozen=True)
class Problem:
    """Shapes and options of one call; no tensors. q (B, Hq, Nq, D), k (B, Hkv, Nk, D),
    v (B, Hkv, Nk, Dv)."""

    device: torch.device
    dtype: torch.dtype
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    window: tuple[int, int]  # (left, right), bottom-right aligned, -1 = unbounded
    block_mask: Any  # fastattn.sparse.BlockMask or None
    scale: float
    needs_grad: bool
    return_lse: bool
    # Score modifiers (fastattn.score_mods defines them): 0.0 / None = off.
    softcap: float = 0.0
    alibi_slopes: Any = None  # float32 tensor (B, Hq), contiguous, on the inputs' device
    dropout_p: float = 0.0
    dropout_seed: int = 0  # 64-bit seed of the counter-based dropout hash
    # True: the backward must be bitwise reproducible (no floating-point atomics); False
    # allows an atomic one. Every backend accepts both; cuda runs its atomic-dQ FA2 backward
    # for False (cpu and triton are atomic-free either way).
    deterministic: bool = True

    @property
    def mask(self) -> KernelMask:
        """The mask as the kernels take it (fastattn.kernel_mask): the window for dense calls,
        the block lists and their token window for block-sparse ones."""
        if self.block_mask is None:
            return KernelMask(window=tuple(self.window))
        if self.window != (-1, -1):
            raise ValueError("a window together with a block mask must be folded into the mask "
                             "(BlockMask.with_window) before it reaches a backend")
        return self.block_mask.kernel_mask()

    @property
    def seed_int64(self) -> int:
        """dropout_seed as the signed int64 the op schemas carry."""
        return int64_seed(self.dropout_seed)

    @property
    def is_masked(self) -> bool:
        return self.window != (-1, -1) or self.block_mask is not None

    @property
    def has_score_mods(self) -> bool:
        return bool(self.softcap) or self.alibi_slopes is not None or self.dropout_p > 0


def fake_outputs(q, v):
    """Meta outputs (out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32) for the
    torch.library fake implementations of the forward and decode ops."""
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, Nq, v.shape[-1])), q.new_empty((B, Hq, Nq), dtype=torch.float32)


@dataclass(frozen=True)
class DecodeProblem:
    """One decode call (fastattn.decode_attention): q (B, Hq, Nq, D) against k_cache
    (B, Hkv, Ncache, D) / v_cache (B, Hkv, Ncache, Dv), row b holding cache_seqlens[b] valid
    tokens; query i sits at position L_b - Nq + i and sees keys within window (left, right)
    of it (right 0 = causal, -1 = unbounded). Validated by the public function."""

    device: torch.device
    dtype: torch.dtype
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Ncache: int
    D: int
    Dv: int
    window: tuple[int, int]
    scale: float
    needs_grad: bool
    cache_seqlens: Any = None  # int tensor (B,) on the inputs' device, or None (all Ncache)
    softcap: float = 0.0
    alibi_slopes: Any = None  # float tensor (Hq,) or (B, Hq), or None
    num_splits: int = 0  # 0 = the kernel's choice


class Backend(abc.ABC):
    """Interface of a backend.

    name:        registry key ("cpu", "triton", ...)
    priority:    higher wins under backend="auto" among those that can serve a call
    available(): (bool, reason) — is it built/installed/usable on this machine at all
    why_not(p):  every reason it cannot serve problem p (empty list = it can)
    forward(...): differentiable attention; returns (out, lse) where lse is (B, Hq, Nq)
                  float32 natural-log log-sum-exp, or None when return_lse is False and
                  computing it would cost extra
    """

    name: str = "?"
    priority: int = 0
    # Declared capabilities, shown by `fastattn info` and the README table.
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    min_head_dim: int = 1
    max_head_dim: int = 0
    supports_window: bool = False
    supports_block_mask: bool = False
    supports_backward: bool = False
    supports_lse: bool = False
    supports_softcap: bool = False
    supports_alibi: bool = False
    supports_dropout: bool = False
    supports_decode: bool = False  # has decode()
    supports_decode_backward: bool = False  # decode() is differentiable (the reference only)

    def available(self) -> tuple[bool, str]:
        return True, "ok"

    def auto_priority(self, p: Problem) -> int | None:
        """Priority under backend="auto" for problem p; None = serve it only when asked by
        name (e.g. Triton's CPU interpreter: correct but far too slow to pick by default)."""
        return self.priority

    def _input_reasons(self, p) -> list[str]:
        """Device, dtype and head dims: what forward and decode share."""
        reasons = []
        if p.device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)}, inputs are on {p.device.type}")
        if p.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"supports dtypes {names}, got {str(p.dtype).replace('torch.', '')}")
        if min(p.D, p.Dv) < self.min_head_dim:
            reasons.append(f"needs head dims >= {self.min_head_dim}, got D={p.D}, Dv={p.Dv}")
        if max(p.D, p.Dv) > self.max_head_dim:
            reasons.append(f"supports head dims up to {self.max_head_dim}, got {max(p.D, p.Dv)}")
        return reasons

    def why_not(self, p: Problem) -> list[str]:
        ok, why = self.available()
        if not ok:
            return [why]
        reasons = self._input_reasons(p)
        if p.window != (-1, -1) and not self.supports_window:
            reasons.append("does not support causal/window masks")
        if p.block_mask is not None and not self.supports_block_mask:
            reasons.append("does not support block masks")
        if p.needs_grad and not self.supports_backward:
            reasons.append("has no backward pass and an input requires grad")
        if p.return_lse and not self.supports_lse:
            reasons.append("cannot return the log-sum-exp (return_lse=True)")
        if p.softcap and not self.supports_softcap:
            reasons.append("does not support softcap")
        if p.alibi_slopes is not None and not self.supports_alibi:
            reasons.append("does not support alibi_slopes")
        if p.dropout_p > 0 and not self.supports_dropout:
            reasons.append("does not support dropout (dropout_p > 0)")
        return reasons

    def why_not_decode(self, d: DecodeProblem) -> list[str]:
        """Every reason this backend cannot serve decode call d (empty list = it can)."""
        if not self.supports_decode:
            return ["has no decode kernel"]
        ok, why = self.available()
        if not ok:
            return [why]
        reasons = self._input_reasons(d)
        if d.needs_grad and not self.supports_decode_backward:
            reasons.append("its decode kernel is inference-only (no backward) and an input "
                           "requires grad; call it under torch.no_grad(), or use "
                           "backend='reference' or fastattn.attention to train")
        if d.softcap and not self.supports_softcap:
            reasons.append("does not support softcap")
        if d.alibi_slopes is not None and not self.supports_alibi:
            reasons.append("does not support alibi_slopes")
        return reasons

    @abc.abstractmethod
    def forward(self, q, k, v, p: Problem):
        """q, k, v as in Problem; returns (out, lse or None)."""

    def decode(self, q, k_cache, v_cache, d: DecodeProblem):
        """Split-KV decode attention; returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq) float32).
        Backends with supports_decode implement it."""
        raise NotImplementedError(f"backend {self.name!r} has no decode kernel")
