"""Packaging: the sdist carries everything the build needs, a build from it runs, and an
extension built against another torch is refused with one clear message.

The build-from-sdist test compiles the whole CPU extension (minutes), so it is marked slow;
.ci/run calls it explicitly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import fastattn
from fastattn import _extension, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_SOURCES = (".h", ".hpp", ".cpp", ".cu", ".cuh")


def _build_sdist(dest) -> str:
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dest)], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    (tarball,) = [p for p in os.listdir(dest) if p.endswith(".tar.gz")]
    return os.path.join(dest, tarball)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    return _build_sdist(tmp_path_factory.mktemp("sdist"))


def test_sdist_carries_every_build_source(sdist):
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
    top = names[0].split("/")[0]
    inside = {n[len(top) + 1:] for n in names}
    # every C++/CUDA source and header of the tree (the extension build includes them)
    wanted = {os.path.relpath(os.path.join(d, f), ROOT)
              for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
              for f in files if f.endswith(BUILD_SOURCES)}
    wanted |= {f"python_pkg/fastattn/{os.path.relpath(os.path.join(d, f), fastattn.__path__[0])}"
               for d, _, files in os.walk(fastattn.__path__[0])
               for f in files if f.endswith(".py") or os.path.basename(d) == "data"}
    wanted |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "DESIGN.md"}
    assert any(w.startswith("csrc/cpu/isa/") for w in wanted)  # the walk found the kernels
    missing = sorted(wanted - inside)
    assert not missing, f"the sdist lacks {missing[:10]} ({len(missing)} files)"
    # never a build artefact: an extension and its record belong to one torch
    shipped = [n for n in inside if n.endswith((".so", ".o")) or n.endswith("_build_info.json")]
    assert not shipped, shipped
    # one version: the metadata's is fastattn.__version__
    with tarfile.open(sdist) as tf:
        pkg_info = tf.extractfile(f"{top}/PKG-INFO").read().decode()
    assert f"\nVersion: {fastattn.__version__}\n" in pkg_info
    assert top == f"fastattn-{fastattn.__version__}"


def test_mismatched_build_record_names_both_torches_and_the_fix(monkeypatch):
    rec = {"torch": "0.0.1+other", "cxx11_abi": True}
    why = _extension.torch_mismatch(rec)
    assert "torch 0.0.1+other" in why and f"torch {torch.__version__}" in why
    assert "--no-build-isolation" in why
    abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    why = _extension.torch_mismatch({"torch": torch.__version__, "cxx11_abi": not abi})
    assert "_GLIBCXX_USE_CXX11_ABI" in why
    assert _extension.torch_mismatch({"torch": torch.__version__, "cxx11_abi": abi}) is None
    assert _extension.torch_mismatch(None) is None  # no record (older build): try to load
    # load() consults the record before importing: the mismatch is the reason, nothing loads
    monkeypatch.setattr(_extension, "build_record", lambda: rec)
    monkeypatch.setattr(_extension, "_loaded", {})
    module, reason = _extension.load("_C")
    assert module is None and "was built against torch 0.0.1+other" in reason
    # an extension that build did not make is "not built", not "built against"
    monkeypatch.setattr(_extension, "build_record", lambda: {**rec, "extensions": ["fastattn._C"]})
    monkeypatch.setattr(_extension, "_loaded", {})
    module, reason = _extension.load("_cuda")
    assert module is None and "built against" not in reason


def test_build_record_matches_the_running_torch():
    rec = _extension.build_record()
    if rec is None:
        pytest.skip("the extension was built without a record (setup.py predates it)")
    assert rec["torch"] == torch.__version__
    assert set(rec["cpu_isa_variants"]) >= {"generic"}
    assert "fastattn._C" in rec["extensions"]


def test_info_check_runs_the_cpu_backend_against_the_reference(capsys):
    if not fastattn.available_backends()["cpu"][0]:
        pytest.skip("cpu extension not built")
    assert cli.main(["info", "--check"]) == 0
    out = capsys.readouterr().out
    assert "build record:" in out
    assert [line for line in out.splitlines() if line.split()[:2] == ["cpu", "PASS:"]]


@pytest.mark.slow
def test_sdist_builds_and_runs(tmp_path):
    """sdist -> unpack -> build the extension in the unpacked tree -> a forward + backward
    through the built module against the reference; then the same tree with a build record
    from another torch is refused, in `fastattn info` and in the cpu backend's reason."""
    sdist = _build_sdist(tmp_path / "dist")
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path, filter="data")
    src = tmp_path / f"fastattn-{fastattn.__version__}"
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=src, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(src / "python_pkg")}
    env.pop("FASTATTN_BACKEND", None)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True)

    where = run("-c", "import fastattn, fastattn._C; print(fastattn._C.__file__)")
    assert where.stdout.strip().startswith(str(src)), where.stdout + where.stderr
    info = run("-m", "fastattn", "info", "--check")
    assert info.returncode == 0, info.stdout + info.stderr
    assert "cpu        PASS" in info.stdout

    record = src / "python_pkg" / "fastattn" / "_build_info.json"
    rec = json.loads(record.read_text())
    rec["torch"] = "0.0.1+other"
    record.write_text(json.dumps(rec))
    info = run("-m", "fastattn", "info")
    assert "built against torch 0.0.1+other" in info.stdout, info.stdout + info.stderr
    refused = run("-c", "import torch, fastattn; q = torch.randn(1, 1, 4, 8)\n"
                        "try:\n fastattn.attention(q, q, q, backend='cpu')\n"
                        "except fastattn.BackendUnavailableError as e: print(e)")
    assert "built against torch 0.0.1+other" in refused.stdout, refused.stdout + refused.stderr
