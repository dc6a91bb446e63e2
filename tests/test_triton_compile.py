"""Ahead-of-time compiles of the triton backend's kernels for sm_80 and sm_90 (no GPU
needed): a few default configs must compile with 0 spills, within shared memory, and on
tensor cores (mma.sync on sm_80, wgmma on sm_90). The full sweep is
benchmarks/triton_compile_report.py (recorded in benchmarks/results/)."""

from __future__ import annotations

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
