"""The cpu backend's kernel variants (csrc/cpu/isa): runtime choice, a sample of the oracle
matrix on every variant this host can run (the full matrix runs on the best one through the
other cpu test files), bitwise reproducibility across runs and thread counts, and a check of
the built binary that AVX2/AVX-512 instructions appear only inside the per-ISA variants.

FASTATTN_CPU_ISA is read on every call, so one process switches variants with monkeypatch."""

import re
import shutil
import subprocess

import pytest
import torch
from conftest import requires_cpu_ext
from oracle import check_against_oracle, make_qkv
from test_cpu_score_mods import _check as check_mods
from test_models_decode import CASES as DECODE_CASES
from test_models_decode import _check as check_decode
from test_models_decode import _inputs as decode_inputs
from test_models_decode import test_cpu_decode_softcap_alibi_window as decode_mods_case

import fastattn
import fastattn.sparse as fs

pytestmark = requires_cpu_ext

from fastattn.backends.cpu import _C  # noqa: E402  (None when the extension is absent)

RUNNABLE = list(_C.cpu_isas()) if _C is not None else []
ALL = ["generic", "avx2", "avx512", "avx512bf16"]


@pytest.fixture(params=ALL)
def isa(request, monkeypatch):
    if request.param not in RUNNABLE:
        pytest.skip(f"this CPU cannot run the {request.param} variant (runnable: {RUNNABLE})")
    monkeypatch.setenv("FASTATTN_CPU_ISA", request.param)
    assert _C.cpu_isa() == request.param
    return request.param


def _call(**kw):
    return lambda q, k, v: fastattn.attention(q, k, v, backend="cpu", return_lse=True, **kw)


# ---------------------------------------------------------------- oracle sample per variant

SAMPLE = [  # B, Hq, Hkv, Nq, Nk, D, Dv, masks
    pytest.param(1, 2, 1, 1, 97, 40, 40, dict(causal=True), id="decode-row-gqa-d40"),
    pytest.param(2, 2, 2, 97, 257, 64, 64, dict(causal=True), id="causal-97x257"),
    pytest.param(1, 4, 2, 257, 97, 16, 24, dict(), id="dense-257x97-dv24"),
    pytest.param(1, 2, 2, 300, 300, 128, 128, dict(window=(37, 5)), id="window-300-d128"),
    pytest.param(1, 1, 1, 17, 1025, 72, 72, dict(window=(-1, 3)), id="window-17x1025-d72"),
]


# every sample shape in float32; the low-precision dtypes on all but the largest (time budget)
SAMPLE_DTYPES = [pytest.param(*case.values, dt, id=f"{case.id}-{str(dt)[6:]}") for case in SAMPLE
                 for dt in (torch.float32, torch.bfloat16, torch.float16)
                 if dt == torch.float32 or case.id != "window-300-d128"]


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,masks,dtype", SAMPLE_DTYPES)
def test_variant_matches_oracle(isa, B, Hq, Hkv, Nq, Nk, D, Dv, masks, dtype):
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, Dv=Dv)
    window = fastattn._validate.normalize_window(masks.get("window"), masks.get("causal", False))
    check_against_oracle(_call(**masks), q, k, v, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("pattern", ["bigbird", "sliding_window_tall", "from_mask_fn"])
def test_variant_block_sparse_matches_oracle(isa, pattern, dtype):
    N = 320
    bm = {
        "bigbird": lambda: fs.bigbird(N, bigbird_block_size=32, num_random_blocks=2, seed=1),
        "sliding_window_tall": lambda: fs.sliding_window(N, N, 70, causal=True, block_size=(128, 64)),
        "from_mask_fn": lambda: fs.from_mask_fn(lambda b, h, i, j: (i + 2 * j) % 7 != 0, N, N,
                                                block_size=(32, 48)),
    }[pattern]()
    q, k, v = make_qkv(1, 2, 1, N, N, 48, dtype)
    check_against_oracle(_call(block_mask=bm), q, k, v, mask=bm.to_dense())


# ---------------------------------------------------------------- the bfloat16 dot-product path

def _bf16_dot_calls(fn):
    from fastattn.backends.cpu import kernel_stats
    kernel_stats(reset=True)
    fn()
    st = kernel_stats(reset=True)
    return st["fwd_bf16_dot"], st["bwd_bf16_dot"]


def test_bf16_dot_path_serves_bfloat16_only_on_its_variant(isa):
    """The avx512bf16 variant runs bfloat16 inputs through its vdpbf16ps products (forward
    and backward); every other variant, and other dtypes, take the float32 products."""
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        q, k, v = make_qkv(1, 2, 1, 70, 90, 32, dtype)
        calls = _bf16_dot_calls(lambda: fastattn.attention(q, k, v, causal=True, backend="cpu").sum().backward())
        want = 1 if isa == "avx512bf16" and dtype == torch.bfloat16 else 0
        assert calls == (want, want), (dtype, calls)


def test_bf16_dot_path_steps_aside_for_odd_tiles():
    """Odd block-mask tile sizes (a pair would straddle two tiles) run the float32 products,
    correctly. (Non-finite inputs stay on the bf16 path: test_nonfinite.py runs its bf16
    cases on the best variant.)"""
    if "avx512bf16" not in RUNNABLE:
        pytest.skip(f"this CPU cannot run the avx512bf16 variant (runnable: {RUNNABLE})")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTATTN_CPU_ISA", "avx512bf16")
    try:
        q, k, v = make_qkv(1, 2, 1, 99, 99, 32, torch.bfloat16)
        bm = fs.from_mask_fn(lambda b, h, i, j: j <= i, 99, 99, block_size=(33, 33))
        fn = _call(block_mask=bm)
        assert _bf16_dot_calls(lambda: fn(q, k, v)[0].sum().backward()) == (0, 0)
        check_against_oracle(fn, q, k, v, mask=bm.to_dense())
    finally:
        mp.undo()


def test_bf16_dot_path_matches_oracle_on_long_rows():
    """Dense and causal rows spanning several merged forward spans (> 512 keys), head dim 128,
    GQA, odd lengths: the P V and dS K pairs cross span and tile edges."""
    if "avx512bf16" not in RUNNABLE:
        pytest.skip(f"this CPU cannot run the avx512bf16 variant (runnable: {RUNNABLE})")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTATTN_CPU_ISA", "avx512bf16")
    try:
        for causal, (Nq, Nk) in ((False, (131, 1301)), (True, (1001, 1001))):
            q, k, v = make_qkv(1, 4, 2, Nq, Nk, 128, torch.bfloat16)
            check_against_oracle(_call(causal=causal), q, k, v,
                                 window=fastattn._validate.normalize_window(None, causal))
    finally:
        mp.undo()


@pytest.mark.parametrize("mods", [dict(softcap=5.0), dict(alibi_slopes=torch.tensor([0.3, 0.05])),
                                  dict(dropout_p=0.2, dropout_seed=7)], ids=["softcap", "alibi", "dropout"])
def test_variant_score_mods_match_oracle(isa, mods):
    q, k, v = make_qkv(1, 2, 1, 97, 113, 40, torch.bfloat16)
    check_mods(q, k, v, torch.bfloat16, causal=True, **mods)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [DECODE_CASES[2], DECODE_CASES[3], DECODE_CASES[4]], ids=str)
def test_variant_decode_matches_oracle(isa, case, dtype):
    B, Hq, Hkv, Nq, N, D, sl, wl, ns = case
    q, k, v = decode_inputs(B, Hq, Hkv, Nq, N, D, dtype)
    check_decode("cpu", q, k, v, None if sl is None else torch.tensor(sl, dtype=torch.int32), wl, ns)


def test_variant_decode_softcap_alibi_window(isa):
    decode_mods_case((7, 3), dict(softcap=5.0, alibi=2), torch.bfloat16)


def test_variants_agree_closely():
    """Different variants round differently (vector widths differ), but all compute the
    same math: their results are close to each other, not only to the oracle."""
    q, k, v = make_qkv(1, 2, 2, 200, 200, 64, torch.float32, requires_grad=False)
    outs = {}
    mp = pytest.MonkeyPatch()
    try:
        for name in RUNNABLE:
            mp.setenv("FASTATTN_CPU_ISA", name)
            outs[name] = fastattn.attention(q, k, v, causal=True, backend="cpu")
    finally:
        mp.undo()
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["generic"], atol=2e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- reproducibility

def test_decode_bitwise_identical_across_thread_counts(isa):
    from fastattn.decode import decode_attention
    q, k, v = decode_inputs(2, 8, 2, 1, 3000, 64, torch.float32)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(decode_attention(q, k, v, backend="cpu", return_lse=True))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def _fwd_bwd(q, k, v, **kw):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fastattn.attention(qq, kk, vv, backend="cpu", **kw)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(50, 20)),
                                dict(block_mask=fs.sliding_window(333, 333, 60, causal=True,
                                                                  block_size=(64, 32)))],
                         ids=["causal", "window", "block_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bitwise_identical_across_runs_and_thread_counts(isa, kw, dtype):
    # B * Hkv = 1 < 8: the backward splits dQ over key tiles; the split count must not
    # follow the thread count, or dQ's summation order (and its bits) would.
    q, k, v = make_qkv(1, 4, 1, 333, 333, 40, dtype)
    n = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2, 1):
            torch.set_num_threads(threads)
            runs.append(_fwd_bwd(q, k, v, **kw))
    finally:
        torch.set_num_threads(n)
    for r in runs[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), runs[0], r):
            assert torch.equal(a, b), f"{name} differs between runs/thread counts on {isa}"


# ---------------------------------------------------------------- selection and errors

def test_auto_picks_the_best_runnable_variant(monkeypatch):
    monkeypatch.delenv("FASTATTN_CPU_ISA", raising=False)
    assert _C.cpu_isa() == RUNNABLE[-1]
    monkeypatch.setenv("FASTATTN_CPU_ISA", "auto")
    assert _C.cpu_isa() == RUNNABLE[-1]
    assert fastattn.cpu_info()["variant"] == RUNNABLE[-1]


def test_unknown_variant_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTATTN_CPU_ISA", "avx9000")
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"FASTATTN_CPU_ISA must be one of auto, generic, avx2, avx512"):
        fastattn.attention(q, q, q, backend="cpu")
    assert fastattn.cpu_info()["variant"].startswith("error:")


def test_forcing_a_variant_the_cpu_lacks_is_refused(monkeypatch):
    missing = [n for n in ALL if n not in RUNNABLE]
    if not missing:
        pytest.skip(f"this CPU runs every variant ({RUNNABLE}); nothing to refuse here")
    monkeypatch.setenv("FASTATTN_CPU_ISA", missing[-1])
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="cannot run that kernel variant|no such kernel variant"):
        fastattn.attention(q, q, q, backend="cpu")


# ---------------------------------------------------------------- the binary

_VEC_REG = re.compile(r"%[yz]mm\d+|\{%k[0-7]\}")
_AVX512_ONLY = re.compile(r"%zmm\d+|%k[0-7]\b|\{%k[0-7]\}")


def _functions_using_avx(objdump_text):
    """{function name: (uses VEX/EVEX (AVX+) instructions, uses AVX-512 registers)}."""
    funcs, name = {}, None
    for line in objdump_text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            funcs.setdefault(name, [False, False])
            continue
        if name is None or "\t" not in line:
            continue
        ins = line.split("\t")[-1].strip()
        mnem = ins.split(" ")[0]
        # VEX/EVEX-encoded instructions all start with 'v' (vmovups, vfmadd231ps, ...) and
        # AVX-512 mask ops with 'k'; legacy SSE never does (verr/verw aside, not emitted).
        if (mnem.startswith("v") and mnem not in ("verr", "verw")) or _VEC_REG.search(ins):
            funcs[name][0] = True
        if _AVX512_ONLY.search(ins) or re.match(r"k(mov|and|or|xor|not|shift|test|add|unpck)", mnem):
            funcs[name][1] = True
    return funcs


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_avx_instructions_only_inside_the_per_isa_variants():
    if _C.native_build():
        pytest.skip("built with FASTATTN_NATIVE=1 (-march=native): the whole extension may use "
                    "the build host's ISA, by request")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__],
                          capture_output=True, text=True, check=True).stdout
    funcs = _functions_using_avx(text)
    avx = {f for f, (any_avx, _) in funcs.items() if any_avx}
    avx512 = {f for f, (_, z) in funcs.items() if z}
    in_avx2 = lambda f: "fastattn::cpu::avx2::" in f
    in_avx512 = lambda f: "fastattn::cpu::avx512::" in f or "fastattn::cpu::avx512bf16::" in f
    # the variants exist and really use their ISA
    assert any(in_avx2(f) for f in avx) and any(in_avx512(f) for f in avx512)
    assert not any(in_avx2(f) for f in avx512), "the avx2 variant holds AVX-512 instructions"
    stray = sorted(f for f in avx if not (in_avx2(f) or in_avx512(f)))
    assert not stray, f"AVX instructions outside the per-ISA variants: {stray[:10]}"
    # bfloat16 dot products only in the avx512bf16 variant
    bf16_funcs = set()
    name = None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
        elif name is not None and re.search(r"\bvdpbf16ps\b", line):
            bf16_funcs.add(name)
    assert bf16_funcs and all("fastattn::cpu::avx512bf16::" in f for f in bf16_funcs), sorted(bf16_funcs)[:5]
    # no AMX anywhere (no AMX variant is built)
    assert not re.search(r"\b(tdpbf16ps|tileloadd|tilestored|ldtilecfg)\b", text)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_inf_inputs_propagate_as_torch(isa, sign):
    # +inf scores make a row NaN in torch (inf - inf in the softmax); -inf scores weigh 0
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, torch.float32, requires_grad=False)
    k[0, 0, 5, 3] = sign * float("inf")
    out = fastattn.attention(q, k, v, backend="cpu")
    ref = fastattn.attention(q.double(), k.double(), v.double(), backend="reference")
    assert torch.isnan(ref).any() and torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    torch.testing.assert_close(out[fin].double(), ref[fin], atol=1e-5, rtol=1e-5)


_CROSS = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.skipif(_CROSS is None, reason="needs the aarch64 cross compiler g++-aarch64-linux-gnu "
                                           "(.ci/run installs it)")
def test_kernels_compile_for_aarch64_through_the_generic_variant(tmp_path):
    """Non-x86 hosts build the generic variant (NEON here) and stub the x86 ones out."""
    from pathlib import Path

    from torch.utils.cpp_extension import include_paths

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    inc = [f"-I{csrc}"] + [f"-I{p}" for p in include_paths()]
    objs = {}
    for name in ("isa/kernels_generic.cpp", "isa/kernels_avx2.cpp", "isa/kernels_avx512.cpp",
                 "isa_dispatch.cpp"):
        obj = tmp_path / (Path(name).stem + ".o")
        r = subprocess.run([_CROSS, "-std=c++17", "-O2", "-ffp-contract=fast", *inc, "-c",
                            str(csrc / "cpu" / name), "-o", str(obj)], capture_output=True, text=True)
        assert r.returncode == 0, f"{name} does not compile for aarch64:\n{r.stderr[-3000:]}"
        objs[name] = obj
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "-C", str(objs["isa/kernels_generic.cpp"])],
                         capture_output=True, text=True).stdout
    assert "fastattn::cpu::generic::" in dis and re.search(r"\tfmla\t", dis)  # vectorized, NEON
    for stub in ("isa/kernels_avx2.cpp", "isa/kernels_avx512.cpp"):
        syms = subprocess.run(["aarch64-linux-gnu-nm", "-C", str(objs[stub])], capture_output=True,
                              text=True).stdout
        assert "fastattn::cpu::kernels_" in syms and "::avx" not in syms.replace("kernels_avx", "")


# ---------------------------------------------------------------- reused operand buffers

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_reused_operand_buffers_leave_no_trace(isa, dtype):
    """The drivers keep their K^T panels and padded copies per calling thread between calls
    (operands.h workspace): a small odd-shaped call after a larger one (whose values are
    still in the buffers, padding included) gives bitwise the same forward and backward as
    before it."""
    small = make_qkv(1, 2, 1, 77, 141, 40, dtype, Dv=24)
    first = _fwd_bwd(*small, causal=True)
    big = make_qkv(2, 4, 2, 700, 700, 64, dtype, seed=5)
    for t in big:
        t.data.mul_(1e3)  # large stale values: any read of a stale pad would show
    _fwd_bwd(*big, window=(100, 0))
    again = _fwd_bwd(*small, causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, again):
        assert torch.equal(a, b), f"{name} changed after a larger call on {isa}"


def test_release_workspace_then_calls_still_match():
    from fastattn.backends.cpu import release_workspace
    q, k, v = make_qkv(1, 2, 1, 77, 141, 40, torch.float32)
    first = _fwd_bwd(q, k, v, causal=True)
    release_workspace()
    again = _fwd_bwd(q, k, v, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
