"""Ahead-of-time compilation of the triton backend's kernels for a GPU we do not have:
triton.compile with a GPUTarget gives PTX (and Triton's shared-memory allocation), and
`ptxas -v` on that PTX gives registers and spills. Used by
benchmarks/triton_compile_report.py and tests/test_triton_compile.py.

A variant is (kernel, dtype, head dim, masking mode, tile config, arch, score modifiers).
Arguments are
specialized the way a launch on contiguous tensors specializes them: 16-byte aligned
pointers, unit inner strides, other strides divisible by 16 when they are.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass

KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
MODES = {  # (WINDOW_LEFT, WINDOW_RIGHT, SPARSE, BITMASK)
    "dense": (False, False, False, False),
    "causal": (False, True, False, False),
    "window": (True, True, False, False),
    "sparse": (True, True, True, True),
}
SCORE_MODS = {"softcap": "SOFTCAP", "alibi": "ALIBI", "dropout": "DROPOUT"}  # name: constexpr
ALL_MODS = "+".join(SCORE_MODS)
_TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass
class Variant:
    kernel: str  # one of KERNELS
    dtype: str  # float16 | bfloat16 | float32
    head_dim: int
    mode: str  # one of MODES
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    arch: int  # 80 | 90
    mask_block: tuple = (128, 128)  # the BlockMask's blocks, sparse mode only
    part: int = 0  # bwd_dkdv: 0 = dK and dV, 1 = dV only, 2 = dK only (head dim 256)
    mods: str = ""  # score modifiers switched on, "+"-joined names from SCORE_MODS
    maxnreg: int | None = None  # triton.Config(maxnreg=...): the PTX's .maxnreg cap
    tma: bool = False  # fwd only: the tensor-descriptor (TMA) variant (TMA=True), sm_90+

    @property
    def config(self) -> str:
        cap = f" r{self.maxnreg}" if self.maxnreg else ""
        tma = " tma" if self.tma else ""
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}{cap}{tma}"


@dataclass
class Result:
    variant: Variant
    registers: int
    spills: int  # spill stores + spill loads, bytes
    stack: int
    smem: int  # bytes Triton allocates (dynamic shared memory)
    smem_limit: int
    mma: bool  # mma.sync (sm_80) / wgmma (sm_90) instructions in the PTX
    wgmma: bool
    mma_sync: bool
    error: str = ""
    tma_ops: bool = False  # cp.async.bulk.tensor (TMA copies) in the PTX
    # set when it spills: the same PTX under `.maxnreg 255` (-1 = not tried)
    registers_maxnreg: int = -1
    spills_maxnreg: int = -1

    @property
    def tensor_cores(self) -> bool:
        """Products on tensor cores: wgmma on sm_90 where the tile allows it (MMA M side
        >= 64 over 4-warp groups), else mma.sync; no products in bwd_preprocess."""
        if self.variant.kernel == "bwd_preprocess":
            return True
        if self.variant.arch >= 90 and expects_wgmma(self.variant):
            return self.wgmma
        return self.mma_sync or self.wgmma

    @property
    def ok(self) -> bool:
        return (not self.error and self.spills == 0 and self.smem <= self.smem_limit
                and self.tensor_cores and (self.tma_ops or not self.variant.tma))

    def row(self) -> dict:
        d = asdict(self.variant)
        d.update(registers=self.registers, spills=self.spills, smem=self.smem, mma=self.mma,
                 wgmma=self.wgmma, tma_ops=self.tma_ops, error=self.error, ok=self.ok)
        return d


def expects_wgmma(v: Variant) -> bool:
    """Hopper's wgmma takes 64-row tiles per 4-warp group: the MMA's M side is BLOCK_M for
    fwd/dQ and BLOCK_N for dK/dV (computed transposed)."""
    m_side = v.block_n if v.kernel == "bwd_dkdv" else v.block_m
    return v.num_warps % 4 == 0 and m_side >= 64


def ptxas_path() -> str | None:
    return shutil.which("ptxas")


def default_variants(kernels=KERNELS, dtypes=("float16", "bfloat16"),
                     head_dims=(16, 32, 64, 128, 256), modes=("causal", "sparse"), archs=(80, 90),
                     mask_block=(128, 128), mods=("",), tma=False):
    """Every config the autotuner may pick for these problem classes (kernels.default_tiles
    on each arch's shared-memory limit, with or without score modifiers). float32 is not
    served on GPUs (see TritonBackend.why_not), so it is not among the defaults. "causal" holds both the masked and the unmasked
    inner loops, so it covers "dense" and "window"; "sparse" is a block mask of `mask_block`
    blocks (fastattn.sparse's default 128 x 128) with bitmasks. mods: the score-modifier sets
    each config is compiled with ("" = none; ALL_MODS = softcap, ALiBi and dropout together);
    bwd_preprocess has none."""
    from ..backends.triton.ops import load_kernels

    kern = load_kernels(interpret=False)
    out = []
    for arch in archs:
        for dtype in dtypes:
            eb = _ELEM_BYTES[dtype]
            for d in head_dims:
                bd = kern.pad_dim(d)
                for kernel in kernels:
                    if kernel == "bwd_preprocess":
                        out.append(Variant(kernel, dtype, d, "dense", 64, 0, 4, 1, arch))
                        continue
                    short = kernel.replace("bwd_", "")
                    for mode in modes:
                        mb = mask_block if mode == "sparse" else None
                        parts = kern.dkdv_parts(bd, bd) if short == "dkdv" else (0,)
                        for m in mods:
                            for bm, bn, w, s, r in kern.default_tiles(
                                    short, bd, bd, eb, kern.SMEM_LIMIT[arch], mb, mods=bool(m),
                                    tma=tma):
                                for part in parts:
                                    out.append(Variant(kernel, dtype, d, mode, bm, bn, w, s, arch,
                                                       mb or (16, 16), part, m, r, tma))
    return out


def tma_variants(dtypes=("float16", "bfloat16"), head_dims=(64, 128), modes=("causal", "sparse"),
                 mask_block=(128, 128), mods=("",)):
    """The forward's TMA variant (TMA=True) for sm_90: every default tile of those classes.
    Only sm_90 has TMA; on sm_80 the descriptors would lower to plain loads, and the backend
    never takes the variant there (ops.tma_policy)."""
    return default_variants(("fwd",), dtypes, head_dims, modes, (90,), mask_block, mods, tma=True)


@functools.lru_cache(maxsize=None)
def system_ptx_version() -> int | None:
    """Highest PTX ISA the ptxas on PATH accepts (CUDA 13.0 -> 90). Triton would otherwise
    emit the ISA of its bundled, newer ptxas, which an older system ptxas rejects."""
    ptxas = ptxas_path()
    if ptxas is None:
        return None
    from triton.backends.nvidia.compiler import ptx_get_version

    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return ptx_get_version(m.group(1)) if m else None


def _signature(fn, v: Variant):
    """signature, constexprs and attrs for triton.compile, as a launch would specialize."""
    from ..backends.triton.ops import load_kernels

    kern = load_kernels(interpret=False)
    tdt = _TRITON_DTYPE[v.dtype]
    wl, wr, sparse, bitmask = MODES[v.mode]
    bd = kern.pad_dim(v.head_dim)
    if v.kernel == "bwd_preprocess":
        const = dict(HEAD_DIM_V=v.head_dim, BLOCK_DV=bd, BLOCK_M=v.block_m, HAS_DLSE=False,
                     stride_ok=1, stride_dk=1)
    else:
        const = dict(HEAD_DIM=v.head_dim, HEAD_DIM_V=v.head_dim, BLOCK_D=bd, BLOCK_DV=bd,
                     BLOCK_M=v.block_m, BLOCK_N=v.block_n, MASK_BM=v.mask_block[0],
                     MASK_BN=v.mask_block[1], WINDOW_LEFT=wl, WINDOW_RIGHT=wr,
                     SPARSE=sparse, BITMASK=bitmask, EVEN_N=False, DOT_UPCAST=False,
                     DOT_PRECISION=kern.dot_precision(_ELEM_BYTES[v.dtype], bd))
        if v.kernel == "bwd_dkdv":
            const["PART"] = v.part
        if v.kernel == "fwd":
            const["TMA"] = v.tma
        on = set(filter(None, v.mods.split("+")))
        if on - set(SCORE_MODS):
            raise ValueError(f"unknown score modifiers {sorted(on - set(SCORE_MODS))}; known: "
                             f"{list(SCORE_MODS)}")
        const.update({flag: name in on for name, flag in SCORE_MODS.items()})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in _INNER_STRIDES:
            const[name] = 1  # contiguous head dim: Triton specializes a stride of 1
        if name in const:
            sig[name] = "constexpr"
        elif name in ("Lse", "Delta", "DLse"):
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("KV_NUM", "KV_IDX", "FULL_KV_NUM", "FULL_KV_IDX", "KV_MASK_ID",
                      "Q_NUM", "Q_IDX", "FULL_Q_NUM", "FULL_Q_IDX", "Q_MASK_ID"):
            sig[name] = "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "PM":
            sig[name] = "*u8"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "Slopes":  # (B, Hq) float32
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("Q", "K", "V", "Out", "O", "DO", "DQ", "DK", "DV"):
            sig[name] = f"*{tdt}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("sm_scale", "cap_in", "cap_out", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_") and v.head_dim % 16 == 0 and not name.startswith(
                    ("stride_b", "stride_i", "stride_f")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


_INNER_STRIDES = {"stride_qk", "stride_kk", "stride_vk", "stride_ok", "stride_dk", "stride_dok",
                  "stride_dqk", "stride_dkk", "stride_dvk"}
_FN_NAME = {"fwd": "_attn_fwd", "bwd_preprocess": "_attn_bwd_preprocess",
            "bwd_dkdv": "_attn_bwd_dkdv", "bwd_dq": "_attn_bwd_dq"}
_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(fn, sig, const, attrs, arch, num_warps, num_stages, maxnreg=None):
    """triton.compile for GPUTarget('cuda', arch) with the PTX ISA capped to the system
    ptxas'; the compiled kernel's .asm holds ttir, ttgir, llir and ptx."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature=sig, constexprs=const, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True)
    if maxnreg:
        options["maxnreg"] = maxnreg
    ptx_version = system_ptx_version()
    if ptx_version is not None:  # an ISA both Triton's ptxas and the system's accept
        from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

        options["ptx_version"] = min(ptx_version, ptx_get_version(get_ptxas(arch).version))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _ttir(fn, sig, const, attrs, arch, num_warps, num_stages):
    """Only the first stage of triton.compile: the typed Triton IR (a second or so, where a
    full compile to PTX takes many)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    src = ASTSource(fn, signature=sig, constexprs=const, attrs=attrs)
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                         backend.get_module_map(), context)
    stages = {}
    backend.add_stages(stages, options, src.language)
    return str(stages["ttir"](module, {"target": target, **options.__dict__}))


def variant_ttir(v: Variant) -> str:
    """The typed Triton IR of a variant (int64 offset checks read it)."""
    from ..backends.triton.ops import load_kernels

    fn = getattr(load_kernels(interpret=False), _FN_NAME[v.kernel])
    sig, const, attrs = _signature(fn, v)
    return _ttir(fn, sig, const, attrs, v.arch, v.num_warps, v.num_stages)


def decode_ttir(kernel: str = "split", arch: int = 80, dtype: str = "float16",
                head_dim: int = 128, group: int = 8, block_m: int = 16, mods: bool = False,
                block_n: int = 64, num_warps: int = 4) -> str:
    return _decode(kernel, arch, dtype, head_dim, group, block_m, mods, block_n, num_warps,
                   ttir_only=True)


def decode_compile(kernel: str = "split", arch: int = 80, dtype: str = "float16",
                   head_dim: int = 128, group: int = 8, block_m: int = 16,
                   mods: bool = False, block_n: int = 64, num_warps: int = 4) -> dict:
    """The decode kernel compiled to PTX and through ptxas -v: {'registers', 'spills',
    'smem', 'error'} (same process caveat as decode_ttir)."""
    try:
        ck = _decode(kernel, arch, dtype, head_dim, group, block_m, mods, block_n, num_warps,
                     ttir_only=False)
    except Exception as e:
        return dict(registers=-1, spills=-1, smem=-1, error=f"triton.compile: {e}")
    ptxas = ptxas_path()
    if ptxas is None:
        return dict(registers=-1, spills=-1, smem=int(ck.metadata.shared), error="no ptxas")
    text, ok = _ptxas(ptxas, f"sm_{arch}a" if arch >= 90 else f"sm_{arch}", ck.asm["ptx"], None)
    regs, spills, _ = _parse_ptxas(text) if ok else (-1, -1, -1)
    return dict(registers=regs, spills=spills, smem=int(ck.metadata.shared),
                error="" if ok else "ptxas: " + text.strip().splitlines()[-1])


def _decode(kernel, arch, dtype, head_dim, group, block_m, mods, block_n, num_warps, ttir_only):
    """The decode kernels (backends/triton/decode.py; kernel 'split' or 'combine') compiled
    ahead of time as a launch on contiguous tensors would specialize them. Needs the module
    imported with the interpreter off (a process without TRITON_INTERPRET=1)."""
    from ..backends.triton import decode

    tdt = _TRITON_DTYPE[dtype]
    if kernel == "split":
        fn = decode._decode_split_kernel
        const = dict(G=group, R=group, S=4, D=head_dim, DV=head_dim, HAS_SEQLENS=True, HAS_WINDOW=True,
                     DOT_F32=dtype == "float32", BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_D=max(16, head_dim), BLOCK_DV=max(16, head_dim), SOFTCAP=mods,
                     ALIBI=mods)
        ptr = {"Q": f"*{tdt}", "K": f"*{tdt}", "V": f"*{tdt}", "SEQLENS": "*i32",
               "O_PART": "*fp32", "LSE_PART": "*fp32", "Slopes": "*fp32"}
        floats = ("scale_log2", "cap_in", "cap_out")
    else:
        fn = decode._decode_combine_kernel
        const = dict(G=group, R=group, S=4, DV=head_dim, BLOCK_S=4, BLOCK_DV=max(16, head_dim))
        ptr = {"O_PART": "*fp32", "LSE_PART": "*fp32", "Out": f"*{tdt}", "LSE": "*fp32"}
        floats = ()
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = ptr[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    if ttir_only:
        return _ttir(fn, sig, const, attrs, arch, num_warps, 3)
    return _compile(fn, sig, const, attrs, arch, num_warps, 3)


def compile_variant(v: Variant, workdir: str | None = None) -> Result:
    """Compile one variant with Triton for sm_<arch>, then run ptxas -v on its PTX."""
    from ..backends.triton.ops import load_kernels

    kern = load_kernels(interpret=False)
    fn = getattr(kern, _FN_NAME[v.kernel])
    limit = kern.SMEM_LIMIT[v.arch]
    try:
        sig, const, attrs = _signature(fn, v)
        ck = _compile(fn, sig, const, attrs, v.arch, v.num_warps, v.num_stages, v.maxnreg)
    except Exception as e:  # report, do not stop the sweep
        msg = str(e).strip().splitlines()
        return Result(v, -1, -1, -1, -1, limit, False, False, False,
                      error=f"triton.compile: {msg[-1] if msg else type(e).__name__}")
    ptx = ck.asm["ptx"]
    smem = int(ck.metadata.shared)
    wgmma = "wgmma.mma_async" in ptx
    mma_sync = re.search(r"\bmma\.sync\.aligned", ptx) is not None
    mma = wgmma if v.arch >= 90 else mma_sync
    tma_ops = "cp.async.bulk.tensor" in ptx
    ptxas = ptxas_path()
    if ptxas is None:
        return Result(v, -1, -1, -1, smem, limit, mma, wgmma, mma_sync, error="ptxas not found",
                      tma_ops=tma_ops)
    arch = f"sm_{v.arch}a" if v.arch >= 90 else f"sm_{v.arch}"
    text, ok = _ptxas(ptxas, arch, ptx, workdir)
    if not ok:
        return Result(v, -1, -1, -1, smem, limit, mma, wgmma, mma_sync,
                      error="ptxas: " + text.strip().splitlines()[-1], tma_ops=tma_ops)
    regs, spills, stack = _parse_ptxas(text)
    r = Result(v, regs, spills, stack, smem, limit, mma, wgmma, mma_sync, tma_ops=tma_ops)
    if spills > 0:
        # Without a register cap in the PTX, ptxas may spill a few bytes to reach the next
        # occupancy level (128 registers at 8 warps, 168 at 4) though 255 are allowed;
        # `.maxnreg 255` (triton.Config(maxnreg=255)) tells whether that is all it was.
        capped = re.sub(r"^(\.reqntid [^\n]*)$", r"\1\n.maxnreg 255", ptx, count=1,
                        flags=re.M)
        text, ok = _ptxas(ptxas, arch, capped, workdir)
        if ok:
            r.registers_maxnreg, r.spills_maxnreg, _ = _parse_ptxas(text)
    return r


def _ptxas(ptxas, arch, ptx, workdir):
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    return proc.stdout + proc.stderr, proc.returncode == 0


def _parse_ptxas(text):
    """(registers, spill bytes (stores + loads), stack frame bytes) from ptxas -v."""
    regs = _PTXAS_RE.search(text)
    spill = _SPILL_RE.search(text)
    return (int(regs.group(1)) if regs else -1,
            int(spill.group(2)) + int(spill.group(3)) if spill else -1,
            int(spill.group(1)) if spill else -1)
