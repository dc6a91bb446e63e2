"""backend="auto" on a CUDA device (DESIGN.md, "GPU dispatch policy"), on a mocked GPU: no real
CUDA tensor is made; Problems say device=cuda and dispatch.select decides. A fastattn GPU
kernel family is picked only where fastattn.gpu_validation records it validated and at least
as fast on that arch, or where no other backend can serve the call; otherwise torch SDPA."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastattn
import fastattn.sparse as fs
from fastattn import dispatch, gpu_validation
from fastattn.backends import cuda as cuda_mod
from fastattn.backends.base import DecodeProblem, Problem
from fastattn.backends.triton import TritonBackend

CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """A pretend sm_90 GPU on which both fastattn GPU families are available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda_mod, "_availability_reasons", lambda: [])
    monkeypatch.setattr(TritonBackend, "available", lambda self: (True, "ok (mocked GPU)"))
    monkeypatch.setattr(gpu_validation, "TABLE", {})
    monkeypatch.setattr(gpu_validation, "_warned", set())
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)


def problem(**kw):
    base = dict(device=CUDA, dtype=torch.bfloat16, B=2, Hq=8, Hkv=8, Nq=1024, Nk=1024, D=128,
                Dv=128, window=(-1, -1), block_mask=None, scale=128 ** -0.5, needs_grad=False,
                return_lse=False)
    base.update(kw)
    return Problem(**base)


def pick(p, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        name = dispatch.select(p, "auto", **kw).name
    return name, [str(x.message) for x in w if "gpu-check" in str(x.message)]


def record(backend, faster=(), correct=True, sanitizer="clean", arch="sm_90"):
    e = gpu_validation.parse_entry(dict(backend=backend, arch=arch, correct=correct,
                                        sanitizer=sanitizer, faster=list(faster)))
    gpu_validation.TABLE[(backend, arch)] = e


def test_plain_attention_goes_to_sdpa_when_nothing_is_validated(gpu):
    for kw in (dict(), dict(window=(-1, 0)), dict(needs_grad=True), dict(Hkv=2),
               dict(D=64, Dv=64), dict(window=(-1, 512), Nq=1536, Nk=1024)):
        name, warned = pick(problem(**kw))
        assert name == "sdpa", kw
        assert not warned


def test_block_mask_goes_to_a_fastattn_kernel_and_warns_once(gpu):
    bm = fs.sliding_window(1024, 1024, 255, causal=True)
    p = problem(block_mask=bm)
    name, warned = pick(p)
    assert name == "cuda"  # cuda before triton among unvalidated families
    assert len(warned) == 1 and "make gpu-check" in warned[0] and "sm_90" in warned[0]
    assert pick(p) == ("cuda", [])  # once
    # a block mask cuda cannot take (32-token blocks) goes to triton, which says so once too
    name, warned = pick(problem(block_mask=fs.sliding_window(1024, 1024, 255, block_size=32)))
    assert name == "triton" and len(warned) == 1 and "'triton'" in warned[0]


@pytest.mark.parametrize("kw", [
    dict(softcap=30.0),
    dict(alibi_slopes=torch.ones(2, 8)),
    dict(window=(-1, 0), Nq=100, Nk=1024),  # bottom-right causal, Nq != Nk
    dict(window=(255, 0)),  # sliding window: SDPA only through an N x N mask
    dict(return_lse=True),
])
def test_calls_sdpa_lacks_go_to_fastattn(gpu, kw):
    name, warned = pick(problem(**kw))
    assert name in ("cuda", "triton") and warned


def test_decode_goes_to_triton(gpu):
    d = DecodeProblem(device=CUDA, dtype=torch.float16, B=2, Hq=8, Hkv=2, Nq=1, Ncache=4096,
                      D=128, Dv=128, window=(-1, 0), scale=128 ** -0.5, needs_grad=False)
    name, warned = pick(d)
    assert name == "triton" and warned


def test_cuda_decode_only_where_cuda_is_validated(gpu, monkeypatch):
    """The cuda family serves decode (split-KV kernels), but auto takes it only where a
    gpu-check validated the cuda family on this arch; before that decode stays on triton (with
    the one-time warning), and backend="cuda" asks for it explicitly."""
    d = DecodeProblem(device=CUDA, dtype=torch.bfloat16, B=2, Hq=8, Hkv=2, Nq=2, Ncache=4096,
                      D=128, Dv=128, window=(-1, 0), scale=128 ** -0.5, needs_grad=False)
    assert dispatch.reasons("cuda", d) == []  # it can serve it
    assert dispatch.select(d, "cuda").name == "cuda"
    assert pick(d)[0] == "triton"
    record("cuda", correct=False)  # a failed check does not validate
    assert pick(d)[0] == "triton"
    record("cuda")
    name, warned = pick(d)
    assert name == "cuda" and not warned
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert pick(d)[0] == "triton"  # the sm_90 record does not count on sm_80
    # what it cannot serve: head dims above 128, an input that requires grad
    big = DecodeProblem(device=CUDA, dtype=torch.bfloat16, B=1, Hq=2, Hkv=1, Nq=1, Ncache=64,
                        D=256, Dv=256, window=(-1, 0), scale=0.0625, needs_grad=True)
    why = " ".join(dispatch.reasons("cuda", big))
    assert "head dims up to 128" in why and "inference-only" in why


def test_validated_and_faster_family_is_picked_for_its_class_only(gpu, monkeypatch):
    record("triton", faster=["fwd/d128/causal"])
    assert pick(problem(window=(-1, 0)))[0] == "triton"
    assert pick(problem())[0] == "sdpa"  # dense: not recorded as faster
    assert pick(problem(window=(-1, 0), needs_grad=True))[0] == "sdpa"  # fwd+bwd: not either
    assert pick(problem(window=(-1, 0), D=256, Dv=256))[0] == "sdpa"  # never timed
    # on another arch the sm_90 record does not count
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert pick(problem(window=(-1, 0)))[0] == "sdpa"


def test_unclean_records_do_not_validate(gpu):
    record("cuda", faster=["fwd/d128/dense"], correct=False)
    record("triton", faster=["fwd/d128/dense"], sanitizer="findings")
    assert pick(problem())[0] == "sdpa"
    name, warned = pick(problem(block_mask=fs.causal(1024)))
    assert name == "cuda" and warned  # neither is validated: the first family, with a warning


def test_validated_family_preferred_where_sdpa_cannot_serve(gpu):
    record("triton")
    name, warned = pick(problem(block_mask=fs.causal(1024)))
    assert name == "triton" and not warned


def test_explicit_backend_is_honoured(gpu):
    for name in ("cuda", "triton", "sdpa", "reference"):
        assert dispatch.select(problem(), name).name == name
    with pytest.raises(dispatch.BackendUnavailableError, match="backend 'cpu' cannot serve"):
        dispatch.select(problem(), "cpu")


def test_env_override_still_wins(gpu, monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    assert dispatch.select(problem(), dispatch.validate_backend_name("auto")).name == "triton"


def test_drop_in_candidates_hand_plain_calls_to_torch(gpu):
    # scaled_dot_product_attention asks among cuda/triton/cpu; the policy answers sdpa, and
    # the drop-in then calls torch's own function
    assert pick(problem(), candidates=("cuda", "triton", "cpu"))[0] == "sdpa"


def test_table_file_round_trip_and_bad_entries(tmp_path, monkeypatch):
    e = dict(backend="triton", arch="sm_80", gpu="NVIDIA A100", correct=True, sanitizer="clean",
             faster=["fwd/d64/dense"], recorded="2026-01-01", source="x")
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"entries": [e]}))
    table = gpu_validation.load_table([f])
    assert table[("triton", "sm_80")].to_json() == e and table[("triton", "sm_80")].validated
    with pytest.raises(ValueError, match="arch"):
        gpu_validation.parse_entry(dict(backend="triton", arch="80"))
    with pytest.raises(ValueError, match="faster"):
        gpu_validation.parse_entry(dict(backend="triton", arch="sm_80", faster="fwd"))
    monkeypatch.setenv(gpu_validation.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="no such file"):
        gpu_validation.load_table()


def test_shipped_table_is_empty_and_info_shows_it(capsys):
    # no GPU check has run for this package yet
    assert gpu_validation.load_table([gpu_validation.TABLE_FILE]) == {}
    from fastattn import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPU validation table" in out and "make gpu-check" in out


def test_sdpa_backend_top_left_causal_matches_reference():
    # the sdpa backend now runs window (-1, Nq - Nk), Nq >= Nk, as torch's is_causal
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    a = fastattn.attention(q, k, v, window=(-1, 4), backend="sdpa")
    b = fastattn.attention(q, k, v, window=(-1, 4), backend="reference")
    torch.testing.assert_close(a, b)
