"""Loads fastattn's compiled extensions (fastattn._C, fastattn._cuda), checking first that they
were built against the torch that is running.

A C++ extension links against one torch's C++ ABI. Loaded into another torch it fails with an
"undefined symbol" import error, or worse, loads and misbehaves. So setup.py writes a build
record, `_build_info.json`, next to the extensions it builds (torch version, C++11 ABI flag,
compiler, flags, CPU kernel variants, CUDA archs), and `load()` reads it *before* importing
the extension: a mismatch becomes one message naming both torch versions and the reinstall
command, which `fastattn info` prints and the cpu/cuda backends give as their reason for
being unavailable.

    load("_C")    -> (module or None, error message or None)   (cached per name)
    build_record() -> the record as a dict, or None when there is none (an older build)
"""

from __future__ import annotations

import importlib
import json
import os

import torch

BUILD_INFO_FILE = "_build_info.json"
REBUILD_HINT = ("rebuild it against the installed torch: from a clone, "
                "`pip install --no-build-isolation -e .` (or `make build`); from an sdist or a "
                "wheel, reinstall with `pip install --no-build-isolation --no-deps "
                "--force-reinstall <sdist or wheel>` in this environment")

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_loaded: dict[str, tuple[object | None, str | None]] = {}


def build_record() -> dict | None:
    """The record setup.py wrote when it built the extensions, or None (no record: the
    extension predates the record, or was never built)."""
    path = os.path.join(_PKG_DIR, BUILD_INFO_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"error": f"unreadable {BUILD_INFO_FILE}: {e}"}


def torch_mismatch(record: dict | None) -> str | None:
    """Why the recorded build cannot run under this torch, or None when it can (or when
    there is no record to compare)."""
    if not record or "torch" not in record:
        return None
    running = torch.__version__
    abi = bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    if record["torch"] != running:
        return (f"fastattn's compiled extension was built against torch {record['torch']} but "
                f"torch {running} is installed; {REBUILD_HINT}")
    if "cxx11_abi" in record and bool(record["cxx11_abi"]) != abi:
        return (f"fastattn's compiled extension was built with _GLIBCXX_USE_CXX11_ABI="
                f"{int(record['cxx11_abi'])} but torch {running} uses {int(abi)}; {REBUILD_HINT}")
    return None


def load(name: str):
    """Import fastattn.<name> if its build matches this torch. Returns (module, None) or
    (None, why-not)."""
    if name in _loaded:
        return _loaded[name]
    record = build_record()
    # the record speaks for the extensions that build made (a CPU-only build made no _cuda)
    built = record.get("extensions", [f"fastattn.{name}"]) if record else []
    why = torch_mismatch(record) if f"fastattn.{name}" in built else None
    module = None
    if why is None:
        try:
            module = importlib.import_module(f"fastattn.{name}")
        except ImportError as e:  # not built, or built against another torch without a record
            why = str(e) or type(e).__name__
            if "undefined symbol" in why:
                why += f" (the extension was likely built against another torch; {REBUILD_HINT})"
    _loaded[name] = (module, why)
    return _loaded[name]
