"""Property tests: hypothesis draws shapes, masks and dtypes; the cpu kernel must equal the
float64 oracle by the DESIGN.md rule on every draw."""

import torch
from conftest import requires_cpu_ext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import check_against_oracle, make_qkv

import fastattn

pytestmark = requires_cpu_ext


@st.composite
def problems(draw):
    Hkv = draw(st.integers(1, 3))
    return dict(
        B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * draw(st.integers(1, 3)),
        Nq=draw(st.integers(1, 150)), Nk=draw(st.integers(1, 150)),
        D=draw(st.sampled_from([8, 16, 24, 40, 64, 72, 128])),
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.tuples(st.integers(-1, 60), st.integers(-1, 60)))),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_cpu_matches_oracle_on_random_problems(pr):
    q, k, v = make_qkv(pr["B"], pr["Hq"], pr["Hkv"], pr["Nq"], pr["Nk"], pr["D"], pr["dtype"],
                       seed=pr["seed"])
    from fastattn._validate import normalize_window

    window = normalize_window(pr["window"], pr["causal"])
    fn = lambda q_, k_, v_: fastattn.attention(q_, k_, v_, causal=pr["causal"], window=pr["window"],
                                               backend="cpu", return_lse=True)
    check_against_oracle(fn, q, k, v, window=window, seed=pr["seed"])
