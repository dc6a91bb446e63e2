"""Route torch.nn.functional.scaled_dot_product_attention to fastattn in existing code.

    with fastattn.patch_sdpa():          # patched inside, torch's own function restored after
        model(x)
    fastattn.patch_sdpa()                # or: patched until fastattn.unpatch_sdpa()

While patched, `torch.nn.functional.scaled_dot_product_attention` is a wrapper around
fastattn.scaled_dot_product_attention (torch's signature and semantics): calls fastattn's
fused kernels can serve run there, everything else (attn_mask, dropout, shapes or dtypes
no backend takes) goes to torch's original, kept on the wrapper as `__fastattn_original__`.

What gets patched: the attribute on torch.nn.functional, which is what code calling
`F.scaled_dot_product_attention(...)` or `torch.nn.functional.scaled_dot_product_attention`
looks up at call time (torch's own nn.MultiheadAttention included). Code that bound the
function earlier with `from torch.nn.functional import scaled_dot_product_attention` holds
torch's original; pass such modules as `modules=[...]` and their global of that name is
patched and restored too. torch._C._nn.scaled_dot_product_attention, the C binding behind
it, is left alone: torch internals call it directly and must keep torch's semantics.

Observability: `fastattn.patching.stats` counts the wrapper's eager calls (`calls`), those
fastattn's kernels served (`fastattn`) and those handed to torch's original (`torch`);
the logger "fastattn.patching" says the same at DEBUG level. Calls traced by torch.compile
are not counted (counting would put Python side effects in the graph).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import api

__all__ = ["patch_sdpa", "unpatch_sdpa", "is_patched", "stats", "SDPAPatch"]

log = logging.getLogger("fastattn.patching")

_NAME = "scaled_dot_product_attention"
_lock = threading.RLock()
_active: list[SDPAPatch] = []  # installed patches, innermost last
_in_call = 0  # > 0 while the wrapper runs (eager); how torch fallbacks are told apart


@dataclass
class PatchStats:
    """Eager calls of the patched function since the last reset()."""

    calls: int = 0  # calls of the patched F.scaled_dot_product_attention
    fastattn: int = 0  # served by a fastattn kernel
    torch: int = 0  # handed to torch's original (arguments fastattn does not cover)

    def reset(self) -> None:
        self.calls = self.fastattn = self.torch = 0


stats = PatchStats()


def _make_wrappers(original):
    """The patched function and the counting stand-in for torch's original."""

    @functools.wraps(original)
    def torch_original(*args, **kwargs):
        if _in_call and not torch.compiler.is_compiling():
            stats.torch += 1
            log.debug("scaled_dot_product_attention -> torch (arguments fastattn does not cover)")
        return original(*args, **kwargs)

    @functools.wraps(original)
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                     is_causal=False, scale=None, enable_gqa=False):
        global _in_call
        if torch.compiler.is_compiling():
            return api.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        with _lock:
            stats.calls += 1
            before = stats.torch
            _in_call += 1
        try:
            out = api.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        finally:
            with _lock:
                _in_call -= 1
        if stats.torch == before:
            stats.fastattn += 1
            log.debug("scaled_dot_product_attention -> fastattn")
        return out

    # fastattn.scaled_dot_product_attention and the sdpa backend find torch's function here.
    scaled_dot_product_attention.__fastattn_original__ = torch_original
    return scaled_dot_product_attention


def _register_jit_builtin(wrapper, original):
    """TorchScript compiles torch.nn.functional's code (nn.MultiheadAttention, scripted
    TransformerEncoder layers) by looking its functions up in a table of builtins keyed by
    the function object; the wrapper is not torch's object, so scripting such a module
    failed while patched ("... code object was expected, got builtin_function_or_method").
    The wrapper is entered under the original's op (scripted code runs torch's op, as it
    does unpatched); returns the table to remove it from on restore, or None."""
    try:
        from torch.jit import _builtins

        op = _builtins._find_builtin(original)
        if op is None:
            return None
        _builtins._register_builtin(wrapper, op)
        return _builtins._get_builtin_table()
    except Exception:  # a torch without this table: scripting is left as torch has it
        return None


class SDPAPatch(contextlib.AbstractContextManager):
    """One installed patch. Returned by patch_sdpa(); `with` it, or call restore()."""

    def __init__(self, modules=()):
        self.modules = [importlib.import_module(m) if isinstance(m, str) else m
                        for m in modules]
        self._saved: list[tuple[object, object]] = []  # (namespace, its previous value)
        self._installed = False
        self._jit_builtin = None  # TorchScript's builtin table, while the wrapper is in it
        self._jit_wrapper = None

    def _install(self):
        with _lock:
            current = F.scaled_dot_product_attention
            original = getattr(current, "__fastattn_original__", None)
            # Already patched: reuse torch's function underneath, never wrap a wrapper.
            original = getattr(original, "__wrapped__", original) or current
            for ns in self.modules:  # check all before changing any
                if getattr(ns, _NAME, None) is None:
                    raise ValueError(f"module {getattr(ns, '__name__', ns)!r} has no global "
                                     f"{_NAME!r} to patch")
            wrapper = _make_wrappers(original)
            self._jit_builtin = _register_jit_builtin(wrapper, original)
            self._jit_wrapper = wrapper
            for ns in [F, *self.modules]:
                self._saved.append((ns, getattr(ns, _NAME)))
                setattr(ns, _NAME, wrapper)
            self._installed = True
            _active.append(self)
        log.debug("patched torch.nn.functional.%s (+%d modules)", _NAME, len(self.modules))
        return self

    def restore(self) -> None:
        """Puts back what this patch replaced. Patches restore in reverse order."""
        with _lock:
            if not self._installed:
                return
            if _active[-1] is not self:
                raise RuntimeError("patch_sdpa() patches must be restored innermost first")
            for ns, prev in reversed(self._saved):
                setattr(ns, _NAME, prev)
            self._saved.clear()
            if self._jit_builtin is not None:
                self._jit_builtin.pop(id(self._jit_wrapper), None)
                self._jit_builtin = None
            self._installed = False
            _active.pop()
        log.debug("restored torch.nn.functional.%s", _NAME)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def patch_sdpa(modules=()) -> SDPAPatch:
    """Routes torch.nn.functional.scaled_dot_product_attention to fastattn (see the module
    docstring) and returns the patch: use it as a context manager, or call
    `fastattn.unpatch_sdpa()` / `.restore()` later. `modules`: modules (or their names)
    that imported the function by name; their global is patched as well."""
    return SDPAPatch(modules)._install()


def unpatch_sdpa() -> None:
    """Restores every patch_sdpa() still installed (a no-op when none is)."""
    with _lock:
        while _active:
            _active[-1].restore()


def is_patched() -> bool:
    return bool(_active)
