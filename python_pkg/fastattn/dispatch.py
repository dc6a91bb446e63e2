"""Backend registry and selection: public API -> dispatch -> one backend.

Backends register here by name; `select(problem, name)` returns the backend that serves a
call. "auto" picks the highest-priority backend that can serve it (cpu on CPU, reference as
the last resort); on a CUDA device it follows the GPU dispatch policy (DESIGN.md, `_gpu_auto`
below): a fastattn kernel family only where fastattn.gpu_validation records it validated and
at least as fast on that GPU architecture, or where no other backend serves the call;
otherwise torch SDPA. FASTATTN_BACKEND overrides "auto". An explicit backend is always
honoured; one that cannot serve the call raises with every reason (and every other
backend's, so the user sees what would work)."""

from __future__ import annotations

import importlib
import os

import torch

from . import gpu_validation
from .backends.base import Backend, DecodeProblem, Problem

# name -> "module:Class", imported lazily so a missing optional dependency (triton, the CUDA
# extension) only makes that backend unavailable.
_BACKEND_PATHS = {
    "reference": "fastattn.backends.reference:ReferenceBackend",
    "sdpa": "fastattn.backends.sdpa:SDPABackend",
    "cpu": "fastattn.backends.cpu:CPUBackend",
    "triton": "fastattn.backends.triton:TritonBackend",
    "cuda": "fastattn.backends.cuda:CUDABackend",
}
_instances: dict[str, Backend | None] = {}
_import_errors: dict[str, str] = {}

BACKEND_NAMES = tuple(_BACKEND_PATHS)


class BackendUnavailableError(ValueError):
    """Raised when the requested backend cannot serve a call; lists every reason."""


@torch._dynamo.assume_constant_result
def _load_all() -> bool:
    """Imports every backend. Under torch.compile dynamo runs this eagerly instead of
    tracing it (it cannot trace importlib), before the traced code first reads _instances."""
    for name in BACKEND_NAMES:
        _load(name)
    return True


def get(name: str) -> Backend | None:
    if torch.compiler.is_compiling():
        _load_all()
    return _load(name)


def _load(name: str) -> Backend | None:
    if name not in _instances:
        mod_name, cls_name = _BACKEND_PATHS[name].split(":")
        try:
            _instances[name] = getattr(importlib.import_module(mod_name), cls_name)()
        except ImportError as e:  # optional backend not present
            _instances[name] = None
            _import_errors[name] = f"not installed: {e}"
        except Exception as e:  # a broken optional backend must not break the others
            _instances[name] = None
            _import_errors[name] = f"failed to load: {type(e).__name__}: {e}"
    return _instances[name]


def availability(name: str) -> tuple[bool, str]:
    b = get(name)
    if b is None:
        return False, _import_errors.get(name, "not installed")
    return b.available()


def available_backends() -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every backend fastattn knows."""
    return {name: availability(name) for name in BACKEND_NAMES}


def reasons(name: str, p: Problem | DecodeProblem) -> list[str]:
    """Why backend `name` cannot serve p: an attention Problem or a DecodeProblem."""
    b = get(name)
    if b is None:
        return [_import_errors.get(name, "not installed")]
    return b.why_not_decode(p) if isinstance(p, DecodeProblem) else b.why_not(p)


def validate_backend_name(backend) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in _BACKEND_PATHS):
        raise ValueError(
            f"backend must be 'auto' or one of {', '.join(repr(n) for n in BACKEND_NAMES)}, "
            f"got {backend!r}"
        )
    if backend == "auto":
        env = os.environ.get("FASTATTN_BACKEND", "").strip()
        if env and env != "auto":
            if env not in _BACKEND_PATHS:
                raise ValueError(
                    f"environment variable FASTATTN_BACKEND must be 'auto' or one of "
                    f"{', '.join(BACKEND_NAMES)}, got {env!r}"
                )
            return env
    return backend


def select(p: Problem | DecodeProblem, backend: str = "auto", *, candidates=None) -> Backend:
    """The backend that serves problem p (attention or decode). `backend` must be validated
    already."""
    if backend != "auto":
        why = reasons(backend, p)
        if why:
            others = []
            for name in BACKEND_NAMES:
                if name != backend:
                    r = reasons(name, p)
                    others.append(f"  {name}: " + ("can serve it" if not r else "; ".join(r)))
            raise BackendUnavailableError(
                f"backend {backend!r} cannot serve this call:\n  - "
                + "\n  - ".join(why)
                + "\nother backends:\n"
                + "\n".join(others)
            )
        return get(backend)
    names = candidates if candidates is not None else BACKEND_NAMES
    if p.device.type == "cuda":
        chosen = _gpu_auto(p, names)
        if chosen is not None:
            return chosen
    ok = [get(n) for n in names if not reasons(n, p) and get(n).auto_priority(p) is not None]
    if not ok:
        detail = "\n".join(f"  {n}: " + "; ".join(reasons(n, p)) for n in names)
        raise BackendUnavailableError(f"no backend can serve this call:\n{detail}")
    # A plain loop rather than max(key=...): torch.compile (dynamo) traces it without a break.
    best = ok[0]
    for b in ok[1:]:
        if b.auto_priority(p) > best.auto_priority(p):
            best = b
    return best


# fastattn's GPU kernel families, in the order auto prefers them among equals
GPU_FAMILIES = ("cuda", "triton")


def _gpu_auto(p: Problem | DecodeProblem, names) -> Backend | None:
    """backend="auto" on a CUDA device (DESIGN.md, "GPU dispatch policy"):
    - a call torch SDPA runs on its own fused paths (dense, or torch's causal; no block mask,
      score modifier or lse): the first fastattn family recorded as validated and at least as
      fast as SDPA for the call's class on this arch (fastattn.gpu_validation), else sdpa
      (returned even when not among `names`: the drop-in hands such calls to torch);
    - any other call fastattn's families can serve (block masks, softcap, ALiBi, dropout,
      bottom-right causal or windows, lse, decode): a validated family if one serves it, else
      the first that does, with a one-time warning naming `make gpu-check`;
    - None otherwise: the priority ranking decides (e.g. sdpa with a boolean mask).
    """
    if not torch.cuda.is_available():  # no GPU to ask: the ranking says why nothing serves it
        return None
    arch = gpu_validation.device_arch(p.device)
    # a family that declines auto for this call (auto_priority None: cuda decode where no
    # gpu-check validated the cuda family) is no candidate
    families = [n for n in GPU_FAMILIES if n in names and not reasons(n, p)
                and get(n).auto_priority(p) is not None]
    if isinstance(p, Problem) and gpu_validation.sdpa_native(p) and not reasons("sdpa", p):
        for n in families:
            if gpu_validation.faster(n, arch, p):
                return get(n)
        return get("sdpa")
    if not families:
        return None
    valid = [n for n in families if gpu_validation.validated(n, arch)]
    name = valid[0] if valid else families[0]
    if not valid and not torch.compiler.is_compiling():
        gpu_validation.warn_unvalidated(name, arch)
    return get(name)
