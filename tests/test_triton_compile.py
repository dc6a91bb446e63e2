"""Ahead-of-time compiles of the triton backend's kernels for sm_80 and sm_90 (no GPU
needed): a few default configs must compile with 0 spills, within shared memory, and on
tensor cores (mma.sync on sm_80, wgmma on sm_90). The full sweep is
benchmarks/triton_compile_report.py (recorded in benchmarks/results/)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

from fastattn.bench import triton_compile as aot  # noqa: E402
from fastattn.backends.triton.ops import load_kernels  # noqa: E402

needs_ptxas = pytest.mark.skipif(aot.ptxas_path() is None,
                                 reason="ptxas (CUDA toolkit) not on PATH: registers and "
                                        "spills come from ptxas -v")

_ELEM = {"float16": 2, "bfloat16": 2, "float32": 4}


def _first_default(kernel, dtype, head_dim, arch, mode="causal", mods="", part_index=0):
    kern = load_kernels(interpret=False)
    short = kernel.replace("bwd_", "")
    bd = kern.pad_dim(head_dim)
    mb = (128, 128) if mode == "sparse" else None
    bm, bn, w, s, r = kern.default_tiles(short, bd, bd, _ELEM[dtype], kern.SMEM_LIMIT[arch], mb,
                                         mods=bool(mods))[0]
    part = kern.dkdv_parts(bd, bd)[part_index] if short == "dkdv" else 0
    return aot.Variant(kernel, dtype, head_dim, mode, bm, bn, w, s, arch, mb or (16, 16), part,
                       mods, r)


CASES = [
    ("fwd", "float16", 64, 80, "causal"),
    ("fwd", "bfloat16", 128, 90, "causal"),
    ("bwd_dkdv", "float16", 64, 90, "causal"),
    ("bwd_dq", "bfloat16", 64, 80, "sparse"),
    ("fwd", "float16", 64, 90, "sparse"),
]
# the hardest ones: dK/dV at head dim 256 (dV, then dK launch; 32-row mma.sync tiles on both
# archs, the documented wgmma exception) and kernels with every score modifier on, where
# ptxas spilled before the tables gained maxnreg
HARD = [
    ("bwd_dkdv", "bfloat16", 256, 80, "sparse", "", 0),
    ("bwd_dkdv", "float16", 256, 90, "sparse", "", 1),
    ("bwd_dkdv", "bfloat16", 256, 90, "causal", aot.ALL_MODS, 1),
    ("bwd_dq", "float16", 256, 90, "sparse", aot.ALL_MODS, 0),
    ("bwd_dq", "bfloat16", 64, 80, "sparse", aot.ALL_MODS, 0),
    ("fwd", "float16", 32, 80, "sparse", aot.ALL_MODS, 0),
]


def _check_clean(v):
    r = aot.compile_variant(v)
    assert not r.error, r.error
    assert r.registers > 0 and r.spills == 0, f"{v}: {r.registers} registers, {r.spills} B spilled"
    assert 0 < r.smem <= r.smem_limit, f"{v}: {r.smem} B shared memory > {r.smem_limit}"
    if v.arch >= 90 and aot.expects_wgmma(v):
        assert r.wgmma, f"{v}: no wgmma on sm_90"
    else:
        assert r.mma_sync, f"{v}: no mma.sync"
    assert r.ok


@needs_ptxas
@pytest.mark.parametrize("kernel,dtype,head_dim,arch,mode", CASES,
                         ids=[f"{c[0]}-{c[1]}-d{c[2]}-sm{c[3]}-{c[4]}" for c in CASES])
def test_default_config_compiles_clean(kernel, dtype, head_dim, arch, mode):
    v = _first_default(kernel, dtype, head_dim, arch, mode)
    if arch >= 90:
        assert aot.expects_wgmma(v), f"{v}: tile too small for wgmma"
    _check_clean(v)


@needs_ptxas
@pytest.mark.parametrize("kernel,dtype,head_dim,arch,mode,mods,part", HARD,
                         ids=[f"{c[0]}-{c[1]}-d{c[2]}-sm{c[3]}-{c[4]}-{c[5] or 'nomods'}-{c[6]}"
                              for c in HARD])
def test_hard_default_configs_compile_clean(kernel, dtype, head_dim, arch, mode, mods, part):
    _check_clean(_first_default(kernel, dtype, head_dim, arch, mode, mods, part))


@needs_ptxas
def test_preprocess_compiles():
    r = aot.compile_variant(aot.Variant("bwd_preprocess", "float32", 40, "dense", 64, 0, 4, 1, 80))
    assert not r.error and r.spills == 0


def test_default_tiles_fit_both_archs():
    kern = load_kernels(interpret=False)
    for kernel in ("fwd", "dkdv", "dq"):
        for eb in (2, 4):
            for bd in (16, 32, 64, 128, 256):
                for arch, limit in kern.SMEM_LIMIT.items():
                    tiles = kern.default_tiles(kernel, bd, bd, eb, limit)
                    assert tiles
                    mods = kern.default_tiles(kernel, bd, bd, eb, limit, mods=True)
                    assert mods and all(t[4] == kern.MODS_MAXNREG for t in mods)
                    for bm, bn, w, _s, _r in tiles + mods:
                        # wgmma wants 4-warp groups and an MMA M side >= 64 (documented
                        # exception: dK/dV at head dim 256)
                        if not (kernel == "dkdv" and bd == 256):
                            assert w % 4 == 0 and (bn if kernel == "dkdv" else bm) >= 64
                    # block masks: tiles divide the mask's blocks
                    for mb in ((16, 16), (32, 128), (128, 128)):
                        for bm, bn, *_ in kern.default_tiles(kernel, bd, bd, eb, limit, mb):
                            assert mb[0] % bm == 0 and mb[1] % bn == 0


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("mods", [False, True])
def test_autotuner_prune_keeps_exactly_the_default_tiles(monkeypatch, arch, mods):
    """The tuner's early prune turns the launch's constexprs into default_tiles' list: every
    listed tile (maxnreg included) survives, nothing else does."""
    import torch

    kern = load_kernels(interpret=False)
    monkeypatch.setattr(kern, "_device_smem", lambda: kern.SMEM_LIMIT[arch])
    configs = kern._configs("dq")
    for kernel in ("fwd", "dkdv", "dq"):
        for bd in (16, 64, 256):
            for sparse, mb in ((False, None), (True, (64, 128))):
                kw = dict(BLOCK_D=bd, BLOCK_DV=bd, SOFTCAP=mods, ALIBI=False, DROPOUT=False,
                          MASK_BM=(mb or (16, 16))[0], MASK_BN=(mb or (16, 16))[1])
                kept = kern._make_prune(kernel, sparse)(
                    configs, {"Q": torch.empty(0, dtype=torch.bfloat16)}, **kw)
                got = sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                              c.num_stages, c.maxnreg or 0) for c in kept)
                want = sorted(t[:4] + (t[4] or 0,) for t in kern.default_tiles(
                    kernel, bd, bd, 2, kern.SMEM_LIMIT[arch], mb, mods=mods))
                assert got == want and got, (kernel, bd, sparse)


# --------------------------------------------------------------------------- int64 offsets
# Index x stride passes 2^31 once a tensor (or a strided view: (B, N, H, D) with N * H * D
# >= 2^31; a KV cache of >= 2^31 elements) is large enough. Allocating such tensors is out of
# the question here, so the kernels' typed IR (Triton's TTIR for sm_80, first compile stage
# only: about a second per kernel) is read instead: every address of a floating-point tile
# (q, k, v, o, dO, dQ, dK, dV, partial outputs: rank-2 pointer tensors) and every scalar base
# offset into a floating-point tensor (batch, head, row block) must be computed in i64. Only
# rank-1 row vectors inside one (batch, head) row block (lse, delta: < N) and the small int32
# block-mask lists may stay i32.

_ADDPTR = re.compile(r"tt\.addptr [^:]+: (tensor<(?P<shape>[0-9x]+)x)?!tt\.ptr<(?P<elt>\w+)>>?, "
                     r"(tensor<[0-9x]+x)?(?P<off>i\d+)>?")


def _narrow_float_offsets(ttir: str) -> list[str]:
    bad, n = [], 0
    for line in ttir.splitlines():
        m = _ADDPTR.search(line)
        if not m or m.group("elt") not in ("f16", "bf16", "f32"):
            continue
        n += 1
        rank = 0 if m.group("shape") is None else m.group("shape").count("x") + 1
        if rank != 1 and m.group("off") != "i64":
            bad.append(line.strip())
    assert n > 0, "no floating-point addresses found: the IR format changed?"
    return bad


INT64_CASES = [("fwd", "causal", ""), ("fwd", "sparse", aot.ALL_MODS),
               ("bwd_preprocess", "dense", ""), ("bwd_dkdv", "sparse", aot.ALL_MODS),
               ("bwd_dq", "causal", aot.ALL_MODS)]


@pytest.mark.parametrize("kernel,mode,mods", INT64_CASES,
                         ids=[f"{k}-{m}-{x or 'nomods'}" for k, m, x in INT64_CASES])
def test_attention_kernel_offsets_are_int64(kernel, mode, mods):
    v = aot.Variant(kernel, "bfloat16", 128, mode, 64, 32, 4, 2, 80, (128, 128), mods=mods)
    ttir = aot.variant_ttir(v)
    assert not _narrow_float_offsets(ttir)
    # the tile offsets really are a row index widened before it meets the row stride
    assert re.search(r"arith\.extsi %offs_[mn]\w* : tensor<\d+xi32> to tensor<\d+xi64>", ttir)


def _in_compiled_mode_process(body: str):
    """Runs body in a fresh process without TRITON_INTERPRET: decode.py is imported once per
    process, in one mode, and these checks need its compiled-mode kernels."""
    code = (f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_triton_compile import _narrow_float_offsets\n"
            "from fastattn.bench import triton_compile as aot\n"
            "from fastattn.backends.triton import decode\n" + textwrap.dedent(body)
            + "\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr[-3000:]


def test_decode_kernel_offsets_are_int64():
    _in_compiled_mode_process("""
        for kernel in ("split", "combine"):
            bad = _narrow_float_offsets(aot.decode_ttir(kernel, mods=True))
            assert not bad, (kernel, bad)
    """)


@needs_ptxas
def test_decode_row_tile_caps_compile_clean():
    # the largest row tile decode_tiles allows, at head dims 128 (sm_80) and 256 (sm_90),
    # softcap and ALiBi on: 0 spills (a 128-row tile spilled kilobytes before row tiling)
    _in_compiled_mode_process("""
        for arch, d in ((80, 128), (90, 256)):
            bm, bn, w = decode.decode_tiles(d)
            r = aot.decode_compile("split", arch, "bfloat16", d, 8, bm, True, bn, w)
            assert not r["error"] and r["registers"] > 0 and r["spills"] == 0, (arch, d, r)
    """)


def test_narrow_offset_detector_flags_int32_tiles():
    ir = ("%k = tt.addptr %a, %b : tensor<64x128x!tt.ptr<bf16>>, tensor<64x128xi32> loc(#l)\n"
          "%q = tt.addptr %Q, %c : !tt.ptr<f16>, i32 loc(#l)\n"
          "%l = tt.addptr %d, %e : tensor<64x!tt.ptr<f32>>, tensor<64xi32> loc(#l)\n"
          "%n = tt.addptr %N, %f : !tt.ptr<i32>, i32 loc(#l)\n")
    assert len(_narrow_float_offsets(ir)) == 2


# --------------------------------------------------------------------------- tuning knobs


def test_autotune_key_uses_power_of_two_length_buckets():
    kern = load_kernels(interpret=False)
    assert "N_CTX_Q" not in kern._KEY and "N_CTX_K" not in kern._KEY
    assert {"LEN_BUCKET_Q", "LEN_BUCKET_K"} <= set(kern._KEY)
    # what the autotuner keys on (the forward also on TMA: its descriptor variant tunes apart)
    assert kern.attn_fwd_dense.keys == kern._KEY + ["TMA"] == kern._KEY_FWD
    assert kern.attn_bwd_dq_dense.keys == kern._KEY
    assert kern.len_bucket(1000) == kern.len_bucket(1024) == 1024
    assert kern.len_bucket(1025) == 2048 and kern.len_bucket(1) == kern.len_bucket(16) == 16


def test_untuned_launch_takes_the_first_table_tile(monkeypatch):
    from fastattn.backends.triton import ops

    kern = load_kernels(interpret=False)
    monkeypatch.setattr(kern, "_device_smem", lambda: kern.SMEM_LIMIT[90])
    meta = dict(BLOCK_D=128, BLOCK_DV=128, SOFTCAP=True, ALIBI=False, DROPOUT=False)
    monkeypatch.setenv(ops.AUTOTUNE_ENV, "0")
    fn, tiles = ops._tiles(kern, "dq", [], 16, 16, False, meta, 2)
    want = kern.default_tiles("dq", 128, 128, 2, kern.SMEM_LIMIT[90], None, mods=True)[0]
    assert fn is kern._attn_bwd_dq
    assert (tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["num_warps"], tiles["num_stages"],
            tiles.get("maxnreg")) == want
    monkeypatch.setenv(ops.AUTOTUNE_ENV, "1")
    assert ops._tiles(kern, "dq", [], 16, 16, False, meta, 2)[0] is kern.attn_bwd_dq_dense


@pytest.mark.parametrize("kernel", ["fwd", "bwd_dq"])
def test_block_sparse_loop_is_flat(kernel):
    # one loop per block list over (listed block, sub-tile) pairs, FlexAttention-style: no
    # loop nested in another, so Triton's software pipeline spans block boundaries
    v = aot.Variant(kernel, "bfloat16", 64, "sparse", 64, 32, 4, 3, 90, (128, 128))
    fors = [len(line) - len(line.lstrip()) for line in aot.variant_ttir(v).splitlines()
            if "scf.for" in line]
    assert len(fors) == 2 and len(set(fors)) == 1, fors
