"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without a GPU: a real dry run that
collects every GPU test module, builds every command line, and writes the results directory
with each step marked "skipped: no GPU". Also: recording a result into the validation table,
and the rule that turns benchmark rows into "at least as fast as SDPA" classes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fastattn.gpu_validation as gv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEPS = ["build_cuda", "tests_triton", "tests_cuda", "tests_triton_tma", "sanitizer", "int64",
         "bench"]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    return r, out


def test_dry_run_exits_0_and_writes_the_directory(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout + r.stderr
    for f in ("results.json", "summary.md", "validation.json", "versions.json"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] is True
    assert [s["name"] for s in res["steps"]] == STEPS
    assert all(s["status"] == "skipped: no GPU" for s in res["steps"])
    env = res["environment"]
    assert env["torch"] and "gpu" in env and "triton" in env and "nvcc" in env
    assert json.loads((out / "validation.json").read_text())["entries"] == []
    summary = (out / "summary.md").read_text()
    assert all(f"| {s} |" in summary for s in STEPS) and "skipped: no GPU" in summary
    assert "skipped: no GPU" in r.stdout  # the short summary is printed


def test_dry_run_collects_every_gpu_test_module(dry_run):
    _, out = dry_run
    steps = {s["name"]: s for s in json.loads((out / "results.json").read_text())["steps"]}
    collected = {**steps["tests_triton"]["collected"], **steps["tests_cuda"]["collected"],
                 **steps["tests_triton_tma"]["collected"]}
    assert set(collected) == {"tests/gpu/test_gpu_triton.py", "tests/gpu/test_gpu_cuda.py",
                              "tests/test_cuda_backend.py", "tests/gpu/test_gpu_triton_tma.py"}
    assert all(n > 0 for n in collected.values()), collected
    assert "collect_errors" not in steps["tests_triton"]


def test_dry_run_builds_every_command_line(dry_run):
    _, out = dry_run
    steps = {s["name"]: s for s in json.loads((out / "results.json").read_text())["steps"]}
    assert all(s["cap_s"] > 0 and s["commands"] for s in steps.values())
    assert sum(s["cap_s"] for s in steps.values()) <= 11 * 60  # about ten minutes in all
    build = steps["build_cuda"]["commands"][0]
    assert "build_ext" in build["cmd"] and build["env"]["FASTATTN_BUILD_CUDA"] == "1"
    assert "FASTATTN_CUDA_ARCHS" in build["env"]  # this GPU's arch only
    san = [c["cmd"] for c in steps["sanitizer"]["commands"]]
    for tool in ("memcheck", "racecheck", "synccheck"):
        for fam in ("triton", "cuda"):
            assert any(tool in c and c[-1] == fam for c in san), (tool, fam)
    assert any("int64" in c["cmd"] for c in steps["int64"]["commands"])
    assert any("bench" in c["cmd"] for c in steps["bench"]["commands"])
    tma = steps["tests_triton_tma"]["commands"][0]
    assert tma["env"] == {"FASTATTN_TRITON_TMA": "1"}  # the TMA forward, requested
    for name in ("tests_triton", "tests_cuda", "tests_triton_tma"):
        cmd = steps[name]["commands"][0]["cmd"]
        assert "pytest" in cmd and all(m in cmd for m in steps[name]["collected"])


def test_record_merges_into_a_table(tmp_path):
    results = tmp_path / "run"
    results.mkdir()
    entry = dict(backend="triton", arch="sm_90", gpu="NVIDIA H100", correct=True,
                 sanitizer="clean", faster=["fwd/d128/causal"], recorded="now", source="run")
    (results / "validation.json").write_text(json.dumps({"entries": [entry]}))
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"about": "x", "entries": [
        dict(entry, faster=[]), dict(entry, backend="cuda")]}))
    r = subprocess.run([sys.executable, str(SCRIPT), "--record", str(results), "--table",
                        str(table)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    t = gv.load_table([table])
    assert t[("triton", "sm_90")].faster == {"fwd/d128/causal"}  # replaced
    assert ("cuda", "sm_90") in t and json.loads(table.read_text())["about"] == "x"  # kept


def test_faster_classes_rule():
    gc = _module()
    rows = []
    for n, (t, s) in zip((1024, 2048, 4096), ((1.0, 1.1), (2.0, 2.0), (3.9, 4.0))):
        for prov, ms in (("triton", t), ("sdpa", s)):
            rows.append(dict(provider=prov, mode="fwd", D=128, causal=True, N=n, ms=ms))
    assert gc.faster_classes(rows, "triton") == ["fwd/d128/causal"]
    rows[-2]["ms"] = 4.1  # slower at one length: not recorded
    assert gc.faster_classes(rows, "triton") == []
    assert gc.faster_classes(rows[:4], "triton") == []  # fewer than 3 lengths


def test_tma_entry_only_on_sm90(tmp_path):
    """validation.json gets a "triton-tma" entry on sm_90+ GPUs, from the TMA tests, its
    sanitizer runs and its bench rows; none on sm_80 (no TMA there)."""
    gc = _module()
    steps = [dict(name="build_cuda", status="pass"),
             dict(name="tests_triton", status="pass", tests=dict(passed=5)),
             dict(name="tests_cuda", status="pass", tests=dict(passed=5)),
             dict(name="tests_triton_tma", status="pass", tests=dict(passed=3)),
             dict(name="sanitizer", status="pass",
                  per_family={"triton": "clean", "cuda": "clean", "triton-tma": "clean"})]
    env = dict(arch="sm_90", gpu="H100")
    entries = {e["backend"]: e for e in gc.validation_entries(env, steps, tmp_path)}
    assert set(entries) == {"triton", "cuda", "triton-tma"}
    assert entries["triton-tma"]["correct"] and entries["triton-tma"]["sanitizer"] == "clean"
    assert not gc.plan(dict(arch="sm_80"), tmp_path)["sanitizer"][-1][0][-1] == "triton-tma"
    assert gc.plan(env, tmp_path)["sanitizer"][-1][0][-1] == "triton-tma"
    env80 = dict(arch="sm_80", gpu="A100")
    assert {e["backend"] for e in gc.validation_entries(env80, steps, tmp_path)} == {"triton",
                                                                                   "cuda"}
