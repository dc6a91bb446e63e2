"""The functions a case times: one attention callable per backend, wrapped per mode.

    reference (naive)  textbook attention: scores = (q * scale) @ k^T materialized, masked,
                       softmax (in float32 at least), @ v; the dense mask is built once per case, like a
                       model that threads its mask through the layers. Same math as
                       fastattn's reference backend (tests check they agree).
    sdpa               torch.nn.functional.scaled_dot_product_attention: is_causal=True for
                       causal, the dense bool mask as attn_mask for other patterns.
    flex               torch.compile(flex_attention) with the pattern's torch BlockMask.
    cpu/triton/cuda    fastattn.attention(..., backend=name) with causal/window/block_mask.

Modes: fwd is inference (torch.no_grad()); bwd times only the backward of a forward done
beforehand (torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)); fwd+bwd times
both. The inputs, dout and masks exist before timing and memory measurement start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastattn

_FLEX = None


def naive_attention(q, k, v, hidden=None, scale=None):
    """q (B, H, N, D), k/v (B, H, N, D); hidden: bool broadcastable to (B, H, N, N), True
    where the key is masked out (precomputed ~mask)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, N, N)
    if hidden is not None:
        s.masked_fill_(hidden, float("-inf"))  # in place: matmul's backward needs no output
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(p, v)


def flex_available() -> tuple[bool, str]:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        return False, f"this torch has no FlexAttention ({e})"
    import shutil

    if not torch.cuda.is_available() and not (shutil.which("g++") or shutil.which("c++")):
        return False, "torch.compile on CPU needs a C++ compiler (g++), none on PATH"
    return True, "ok"


def compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def attention_fn(backend: str, pattern, device: str):
    """A callable (q, k, v) -> out for `backend` on `pattern` (a bench.patterns.Pattern).
    Masks are built here, once, outside anything timed."""
    if backend == "reference":
        mask = pattern.dense_mask(device)
        hidden = None if mask is None else ~mask
        return lambda q, k, v: naive_attention(q, k, v, hidden)
    if backend == "sdpa":
        if not pattern.masked:
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
        if pattern.name == "causal":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = pattern.dense_mask(device)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "flex":
        flex = compiled_flex()
        bm = pattern.flex_block_mask(device)
        return lambda q, k, v: flex(q, k, v, block_mask=bm)
    kwargs = pattern.attention_kwargs()
    if "block_mask" in kwargs:
        kwargs["block_mask"] = kwargs["block_mask"].to(device)
    return lambda q, k, v: fastattn.attention(q, k, v, backend=backend, **kwargs)


class ModeRunner:
    """call() runs one repetition of `mode`; prepare() does the untimed part (the forward
    whose graph `bwd` differentiates)."""

    def __init__(self, fn, q, k, v, dout, mode: str):
        self.fn, self.q, self.k, self.v, self.dout, self.mode = fn, q, k, v, dout, mode
        self.out = None

    def prepare(self):
        if self.mode == "bwd":
            with torch.enable_grad():
                self.out = self.fn(self.q, self.k, self.v)

    def call(self):
        q, k, v = self.q, self.k, self.v
        if self.mode == "fwd":
            with torch.no_grad():
                return self.fn(q, k, v)
        if self.mode == "bwd":
            return torch.autograd.grad(self.out, (q, k, v), self.dout, retain_graph=True)
        with torch.enable_grad():
            out = self.fn(q, k, v)
            return torch.autograd.grad(out, (q, k, v), self.dout)

    def release(self):
        self.out = None


def make_inputs(B, H, N, D, dtype, device, mode, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    grad = mode != "fwd"

    def t():
        x = torch.randn((B, H, N, D), generator=g, dtype=torch.float32).to(device, dtype)
        return x.requires_grad_(grad)

    q, k, v = t(), t(), t()
    dout = torch.randn((B, H, N, D), generator=g).to(device, dtype) if grad else None
    return q, k, v, dout
