"""Internal: block-level classification of a token predicate by interval arithmetic.

`classify_by_intervals(fn, b, h, q_lo, q_hi, kv_lo, kv_hi)` calls the user's vectorized
predicate fn(b, h, q_idx, kv_idx) once for E blocks at a time, with q_idx and kv_idx standing
for the whole integer ranges [q_lo, q_hi] and [kv_lo, kv_hi] of each block (b and h are
exact). Arithmetic on them (+, -, *, //, %, abs, unary -) gives ranges that hold every value
the expression can take on the block; comparisons give "may be true" / "may be false"; &, |,
^ and ~ combine those. The answer per block is sound: ALL_TRUE means the predicate is True on
every token of the block, ALL_FALSE on none, UNKNOWN means the tokens must be evaluated. Any
operation outside this small algebra (indexing a tensor with q_idx, torch functions, Python
control flow on a value) raises inside fn; the caller then evaluates every token, so the
analysis can only save work, never change a result.
"""

from __future__ import annotations

import torch

ALL_FALSE, UNKNOWN, ALL_TRUE = 0, 1, 2


class Unsupported(TypeError):
    """fn used an operation the interval algebra does not model."""


def _as_range(x):
    if isinstance(x, _Range):
        return x
    if isinstance(x, bool):
        raise Unsupported("bool operand in arithmetic")
    if isinstance(x, int):
        t = torch.tensor(x, dtype=torch.int64)
        return _Range(t, t)
    if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool:
        x = x.to(torch.int64)
        return _Range(x, x)
    raise Unsupported(f"operand of type {type(x).__name__}")


def _as_tri(x):
    if isinstance(x, _Tri):
        return x
    if isinstance(x, bool):
        t = torch.tensor(x)
        return _Tri(t, ~t)
    if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
        return _Tri(x, ~x)
    raise Unsupported(f"logical operand of type {type(x).__name__}")


class _Range:
    """Integer values in [lo, hi] per block (int64 tensors broadcasting over blocks)."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def __bool__(self):
        raise Unsupported("truth value of an index range")

    __index__ = __int__ = __float__ = __bool__

    def __getattr__(self, name):  # .view, .clamp, ...: not modelled
        raise Unsupported(f"attribute {name!r} of an index range")

    def __add__(self, o):
        o = _as_range(o)
        return _Range(self.lo + o.lo, self.hi + o.hi)

    __radd__ = __add__

    def __sub__(self, o):
        o = _as_range(o)
        return _Range(self.lo - o.hi, self.hi - o.lo)

    def __rsub__(self, o):
        return _as_range(o) - self

    def __neg__(self):
        return _Range(-self.hi, -self.lo)

    def __pos__(self):
        return self

    def __mul__(self, o):
        o = _as_range(o)
        c = torch.stack(torch.broadcast_tensors(self.lo * o.lo, self.lo * o.hi,
                                                self.hi * o.lo, self.hi * o.hi))
        return _Range(c.amin(0), c.amax(0))

    __rmul__ = __mul__

    def __abs__(self):
        lo = torch.where(self.lo >= 0, self.lo, torch.where(self.hi <= 0, -self.hi, 0))
        hi = torch.maximum(self.lo.abs(), self.hi.abs())
        return _Range(lo, hi)

    def abs(self):
        return abs(self)

    def _const_pos(self, o, what):
        o = _as_range(o)
        if not (bool((o.lo == o.hi).all()) and bool((o.lo > 0).all())):
            raise Unsupported(f"{what} by a range or a non-positive value")
        return o.lo

    def __floordiv__(self, o):  # monotone for a positive constant divisor
        d = self._const_pos(o, "floor division")
        return _Range(torch.div(self.lo, d, rounding_mode="floor"),
                      torch.div(self.hi, d, rounding_mode="floor"))

    def __mod__(self, o):  # torch/Python remainder: in [0, d) for d > 0
        d = self._const_pos(o, "remainder")
        same = torch.div(self.lo, d, rounding_mode="floor") == torch.div(self.hi, d,
                                                                         rounding_mode="floor")
        lo = torch.where(same, torch.remainder(self.lo, d), 0)
        hi = torch.where(same, torch.remainder(self.hi, d), d - 1)
        return _Range(lo, hi)

    # comparisons -> _Tri(may_true, may_false)
    def __le__(self, o):
        o = _as_range(o)
        return _Tri(self.lo <= o.hi, self.hi > o.lo)

    def __lt__(self, o):
        o = _as_range(o)
        return _Tri(self.lo < o.hi, self.hi >= o.lo)

    def __ge__(self, o):
        return _as_range(o) <= self

    def __gt__(self, o):
        return _as_range(o) < self

    def __eq__(self, o):
        o = _as_range(o)
        overlap = (self.lo <= o.hi) & (o.lo <= self.hi)
        single = (self.lo == self.hi) & (o.lo == o.hi) & (self.lo == o.lo)
        return _Tri(overlap, ~single)

    def __ne__(self, o):
        return ~(self == o)

    __hash__ = None


class _Tri:
    """Per block: may the predicate be True somewhere (mt) / False somewhere (mf)."""

    __slots__ = ("mt", "mf")

    def __init__(self, mt, mf):
        self.mt, self.mf = mt, mf

    def __bool__(self):
        raise Unsupported("truth value of a block-level predicate")

    def __getattr__(self, name):
        raise Unsupported(f"attribute {name!r} of a block-level predicate")

    def __and__(self, o):
        o = _as_tri(o)
        return _Tri(self.mt & o.mt, self.mf | o.mf)

    __rand__ = __and__

    def __or__(self, o):
        o = _as_tri(o)
        return _Tri(self.mt | o.mt, self.mf & o.mf)

    __ror__ = __or__

    def __invert__(self):
        return _Tri(self.mf, self.mt)

    def __xor__(self, o):
        o = _as_tri(o)
        mt = (self.mt & o.mf) | (self.mf & o.mt)
        mf = (self.mt & o.mt) | (self.mf & o.mf)
        return _Tri(mt, mf)

    __rxor__ = __xor__

    def __eq__(self, o):
        return ~(self ^ o)

    def __ne__(self, o):
        return self ^ o

    __hash__ = None


def classify_by_intervals(fn, b, h, q_lo, q_hi, kv_lo, kv_hi) -> torch.Tensor:
    """ALL_FALSE / UNKNOWN / ALL_TRUE per block (int64 (E,)); raises Unsupported (or
    whatever fn raises) when fn steps outside the interval algebra. b, h, *_lo, *_hi: (E,)
    int64; bounds inclusive."""
    E = q_lo.shape[0]
    v = lambda t: t.view(E, 1, 1)
    out = fn(v(b), v(h), _Range(v(q_lo), v(q_hi)), _Range(v(kv_lo), v(kv_hi)))
    tri = _as_tri(out)
    mt = torch.broadcast_to(tri.mt, (E, 1, 1)).reshape(E)
    mf = torch.broadcast_to(tri.mf, (E, 1, 1)).reshape(E)
    return torch.where(~mf, ALL_TRUE, torch.where(~mt, ALL_FALSE, UNKNOWN))
