"""The benchmark harness itself: FLOP formula, skip predictions, output schema, the masks each
backend gets, and a tiny sweep end to end (child process, table, CSV/JSON, plots).
Timings are never asserted, only that they exist."""

import csv
import json
import math
import os

import fastattn
import pytest
import torch
from fastattn.bench import report
from fastattn.bench.cli import main as bench_main
from fastattn.bench.cli import parse_seqlens
from fastattn.bench.patterns import Pattern, layout_mask_mod
from fastattn.bench.providers import naive_attention
from fastattn.bench.runner import Result, Sweep
from fastattn.bench.spec import (
    Case,
    Config,
    GiB,
    SweepSpec,
    attention_flops,
    predict_skip,
    work_units,
)

AVAIL = {"reference": (True, "ok"), "sdpa": (True, "ok"), "cpu": (True, "ok"),
         "flex": (True, "ok"), "triton": (True, "ok"), "cuda": (False, "not built")}
CFG = Config(1, 2, 64, "fp32")


# ---------------------------------------------------------------------------- FLOPs
def test_flop_formula():
    B, H, N, D = 2, 3, 1024, 64
    fwd = attention_flops(B, H, N, N, D, "fwd")
    assert fwd == 4 * B * H * N * N * D
    assert attention_flops(B, H, N, N, D, "bwd") == 2.5 * fwd
    assert attention_flops(B, H, N, N, D, "fwd+bwd") == 3.5 * fwd
    # Nq != Nk and masked work: only visible pairs count.
    assert attention_flops(1, 1, 128, 512, 32, "fwd") == 4 * 128 * 512 * 32
    causal_pairs = N * (N + 1) / 2
    assert attention_flops(B, H, N, N, D, "fwd", visible_pairs=causal_pairs) == \
        pytest.approx(fwd * (N + 1) / (2 * N))
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 8, 8, 8, "backward")


def test_pattern_facts_feed_flops():
    p = Pattern.build("causal", 1000)
    assert p.visible_pairs == pytest.approx(1000 * 1001 / 2)
    assert p.visited_pairs >= p.visible_pairs
    w = Pattern.build("window", 8192)
    assert w.visible_pairs < 8192 * 513 + 1  # each row sees at most 513 keys
    assert Pattern.build("dense", 512).visible_pairs == 512 * 512


# ---------------------------------------------------------------------------- skips
def _skip(backend, pattern="causal", mode="fwd", N=4096, budget=8 * GiB, prev=None,
          device="cpu", **kw):
    spec = SweepSpec(mem_budget=budget, **kw)
    case = Case(backend, pattern, mode, N, CFG, device)
    info = Pattern.build(pattern, min(N, 4096)).info() if pattern != "dense" else \
        {"masked": False, "layouts": 1}
    return predict_skip(case, spec, AVAIL, info, prev)


def test_skip_unavailable_and_device():
    assert "cuda unavailable: not built" in _skip("cuda")
    assert "need a GPU" in _skip("triton")  # available, but CPU tensors: interpreter only
    assert "CPU tensors" in _skip("cpu", device="cuda")
    assert _skip("cpu") is None and _skip("sdpa") is None and _skip("reference") is None


def test_skip_flex_backward_on_cpu():
    assert _skip("flex", mode="fwd") is None
    for mode in ("bwd", "fwd+bwd"):
        assert "no backward on CPU" in _skip("flex", mode=mode)


def test_skip_memory_naive_quadratic():
    # 64k x 64k fp32 scores for 2 heads = 32 GiB per copy: far past 8 GiB.
    why = _skip("reference", pattern="dense", N=1 << 16)
    assert why and "naive N^2 scores" in why and "> budget 8.0 GiB" in why
    assert _skip("cpu", pattern="dense", N=1 << 16) is None  # fused: O(N) memory
    assert _skip("sdpa", pattern="dense", N=1 << 16) is None  # flash path, no mask
    assert "dense N^2 mask" in _skip("sdpa", pattern="window", N=1 << 16)
    assert "create_block_mask" in _skip("flex", pattern="window", N=1 << 16)
    # Backward keeps more N^2 buffers than forward: it hits the budget at a smaller N.
    b = int(1.5 * GiB)  # 8k: 0.5 GiB per N^2 copy; fwd holds 2, fwd+bwd 4
    assert _skip("reference", pattern="dense", N=8192, budget=b) is None
    assert _skip("reference", pattern="dense", mode="fwd+bwd", N=8192, budget=b) is not None


def test_skip_time_extrapolated_from_previous_n():
    info_small = Pattern.build("window", 4096).info()
    prev = {"N": 2048, "time_s": 2.0, "work": 2048.0 ** 2}
    # naive's work is N^2: 2 s at 2k -> 8 s per call at 4k, x5 calls > 25 s budget.
    why = _skip("reference", pattern="window", N=4096, prev=prev, case_budget=25.0)
    assert why and "predicted 8.0 s/call" in why and "N=2048" in why
    # The sparse kernel's work is its visited blocks: linear in N, stays under budget.
    prev_cpu = {"N": 2048, "time_s": 0.5,
                "work": Pattern.build("window", 2048).info()["visited_pairs"]}
    case = Case("cpu", "window", "fwd", 4096, CFG)
    assert work_units(case, info_small) < 2.5 * prev_cpu["work"]
    assert _skip("cpu", pattern="window", N=4096, prev=prev_cpu, case_budget=25.0) is None


# ---------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name", ["causal", "window", "bigbird", "longformer", "strided",
                                  "streaming"])
def test_naive_matches_reference_backend(name):
    N = 300  # not a multiple of any block size
    p = Pattern.build(name, N)
    q, k, v = (torch.randn(1, 2, N, 16, dtype=torch.float64) for _ in range(3))
    ours = naive_attention(q, k, v, ~p.dense_mask())
    ref = fastattn.attention(q, k, v, backend="reference", **p.attention_kwargs())
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("name", ["bigbird", "longformer", "strided", "streaming"])
def test_flex_mask_mod_is_the_fastattn_mask(name):
    from torch.nn.attention.flex_attention import create_mask

    p = Pattern.build(name, 300)
    dense = create_mask(layout_mask_mod(p.block_mask), None, None, 300, 300, device="cpu")
    assert torch.equal(dense[0, 0], p.block_mask.to_dense()[0, 0])


# ---------------------------------------------------------------------------- schema
def _fake_results():
    ok = Result(Case("cpu", "causal", "fwd", 1024, CFG), "ok", time_s=0.01, times=[0.01] * 3,
                mem_bytes=1 << 20, density=0.5, visited_blocks=36.0, flops=1e9, tflops=0.1,
                speedup_vs_naive=5.0, speedup_vs_sdpa=1.1)
    skip = Result(Case("reference", "causal", "fwd", 65536, CFG), "skipped",
                  "needs ~40 GiB (naive N^2 scores) > budget 8.0 GiB", density=0.5)
    meta = {"command": "fastattn bench --quick", "timestamp": "2025-01-01T00:00:00+00:00",
            "machine": {"cpu": "test cpu", "gpu": None, "cpu_count": 2},
            "versions": {"fastattn": "0.1.0", "torch": "2", "triton": None}}
    return [ok, skip], meta


def test_csv_json_schema(tmp_path):
    results, meta = _fake_results()
    report.write_csv(tmp_path / "r.csv", results, meta)
    report.write_json(tmp_path / "r.json", results, meta)
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == report.CSV_FIELDS
    assert len(rows) == len(results) * len(report.METRICS)
    keys = {(r["kernel"], r["backend"], r["pattern"], r["mode"], r["metric"], r["N"],
             r["config"], r["device"]) for r in rows}
    assert len(keys) == len(rows)  # one row per key
    t = next(r for r in rows if r["backend"] == "cpu" and r["metric"] == "time_ms")
    assert float(t["value"]) == pytest.approx(10.0) and t["status"] == "ok"
    s = next(r for r in rows if r["backend"] == "reference" and r["metric"] == "time_ms")
    assert s["value"] == "" and s["status"] == "skipped" and "naive N^2" in s["reason"]
    assert all(r["command"] == "fastattn bench --quick" and r["torch"] == "2" for r in rows)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc) == {"meta", "rows", "cases"}
    assert doc["meta"]["machine"]["cpu"] == "test cpu"
    assert len(doc["rows"]) == len(rows) and doc["cases"][0]["times_s"] == [0.01] * 3
    md = report.markdown_table(results)
    assert "skip[1]" in md and "naive N^2 scores" in md


def test_json_round_trip_rerenders(tmp_path):
    results, meta = _fake_results()
    report.write_json(tmp_path / "r.json", results, meta)
    back, meta2 = report.load_json(tmp_path / "r.json")
    assert meta2 == meta
    assert [(r.case, r.status, r.reason, r.time_s, r.mem_bytes) for r in back] == \
        [(r.case, r.status, r.reason, r.time_s, r.mem_bytes) for r in results]
    assert report.markdown_table(back) == report.markdown_table(results)


def test_parse_seqlens():
    assert parse_seqlens("512-4k") == (512, 1024, 2048, 4096)
    assert parse_seqlens("1k,16k,1M") == (1024, 16384, 1 << 20)


# ---------------------------------------------------------------------------- end to end
def _tiny(out, backends, budget_gb):
    return bench_main(["--preset", "tiny", "--backends", backends,
                       "--patterns", "causal,bigbird", "--modes", "fwd,bwd,fwd+bwd",
                       "--seqlens", "256", "--threads", "1", "--no-progress",
                       "--mem-budget-gb", str(budget_gb), "--out", str(out)])


def test_tiny_sweep_end_to_end(tmp_path):
    out = tmp_path / "run"
    # flex is left out here (torch.compile takes tens of seconds); see the slow test below.
    # 0.6 MiB-ish budget: fused kernels' O(N) buffers fit, naive's N^2 scores do not.
    assert _tiny(out, "reference,sdpa,cpu,triton", 0.6e-3) == 0
    doc = json.loads((out / "results.json").read_text())
    cases = {(c["backend"], c["pattern"], c["mode"]): c for c in doc["cases"]}
    assert len(cases) == 4 * 2 * 3
    for pattern in ("causal", "bigbird"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            c = cases[("cpu", pattern, mode)]
            assert c["status"] == "ok", c["reason"]
            assert len(c["times_s"]) >= 3 and all(t > 0 for t in c["times_s"])
            assert c["mem_bytes"] is not None
            # 1.2 MB budget: the naive N^2 buffers do not fit, fused kernels do.
            assert cases[("reference", pattern, mode)]["status"] == "skipped"
            assert "naive N^2" in cases[("reference", pattern, mode)]["reason"]
            assert cases[("triton", pattern, mode)]["status"] == "skipped"
    assert cases[("sdpa", "causal", "fwd")]["status"] == "ok"  # is_causal: no N^2 mask
    assert "dense N^2 mask" in cases[("sdpa", "bigbird", "fwd")]["reason"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    tf = [r for r in rows if r["backend"] == "cpu" and r["metric"] == "tflops"]
    assert tf and all(float(r["value"]) > 0 for r in tf)
    sp = [r for r in rows if r["backend"] == "cpu" and r["metric"] == "speedup_vs_sdpa"
          and r["value"] != ""]  # sdpa ran where it needs no N^2 mask (causal)
    assert sp and all(float(r["value"]) > 0 for r in sp)
    for f in ("results.md", "time_fwd.png", "time_bwd.png", "time_fwd_bwd.png"):
        assert os.path.getsize(out / f) > 0
    md = (out / "results.md").read_text()
    assert "--preset tiny" in md and "## Headline" in md


def test_case_time_limit_marks_timeout_and_sweep_goes_on():
    spec = SweepSpec(backends=("cpu", "sdpa"), patterns=("causal",), modes=("fwd",),
                     seqlens=(128, 256), configs=(Config(1, 1, 16, "fp32"),),
                     case_timeout=1e-6, threads=1, mem_budget=GiB, target_time=0.0)
    results = Sweep(spec).run()
    assert len(results) == 4
    assert all(r.status == "timeout" and "time limit" in r.reason for r in results)
    assert all(r.flops and not math.isnan(r.flops) for r in results)


@pytest.mark.slow
def test_tiny_sweep_with_flex(tmp_path):
    assert _tiny(tmp_path, "sdpa,flex,cpu", 1.0) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    cases = {(c["backend"], c["pattern"], c["mode"]): c for c in doc["cases"]}
    for pattern in ("causal", "bigbird"):
        assert cases[("flex", pattern, "fwd")]["status"] == "ok"
        for mode in ("bwd", "fwd+bwd"):
            assert "no backward on CPU" in cases[("flex", pattern, mode)]["reason"]


def test_log_output_says_each_unavailable_backend_once(capsys):
    """Without a terminal the bench prints a line per case, but a skip for the same
    (backend, reason) only once, then a count."""
    from rich.console import Console

    from fastattn.bench.cli import _run_with_progress
    from fastattn.bench.runner import Result
    from fastattn.bench.spec import Case, Config

    cases = [Case(b, "causal", "fwd", N, Config()) for N in (1024, 2048, 4096)
             for b in ("cpu", "triton")]

    class FakeSweep:
        on_result = None

        def run(self):
            out = []
            for c in cases:
                r = (Result(c, "ok", time_s=1e-3) if c.backend == "cpu"
                     else Result(c, "skipped", "triton unavailable: no GPU"))
                self.on_result(r)
                out.append(r)
            return out

    console = Console(file=open(os.devnull, "w"), force_terminal=False)
    results = _run_with_progress(FakeSweep(), len(cases), console, show=True)
    text = capsys.readouterr().out
    assert len(results) == 6
    assert text.count("triton unavailable: no GPU") == 1, text
    assert text.count("causal fwd N=") == 3  # every measured case has its line
    assert "(2 more cases skipped for the reasons above)" in text
