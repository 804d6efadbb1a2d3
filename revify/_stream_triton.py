"""The Triton kernels of the fused exact stream steps (NOTE [ Fused streams ] in _fused.py).

Imported only where one runs (CUDA, or Triton's interpreter in tests): Triton resolves the names
a kernel calls in this module's globals.
"""

import triton
import triton.language as tl

_MAX_FINITE = 3.4028234663852886e38  # the largest float32


@triton.jit
def rounded(u_ptr, m_ptr, offs, mask, big, HAS_M: tl.constexpr):
    v = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_M:
        v = v - tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (v + big) - big  # v to the nearest multiple of delta (NOTE [ Stream kernels ])


@triton.jit
def bf16_bits(x):
    """The bits of fp32 ``x`` rounded to bf16, to nearest even as torch rounds, from the bits (a
    cast's rounding is the backend's: Triton's interpreter truncates); NaN is bf16's NaN."""
    bits = x.to(tl.int32, bitcast=True)
    half = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, half).to(tl.int16)


@triton.jit
def next_kernel(
    u_ptr,
    m_ptr,
    p_ptr,
    c_ptr,
    delta_ptr,
    out_ptr,
    packed_ptr,
    top_ptr,
    half_ptr,
    n,
    outer,
    D: tl.constexpr,
    HAS_M: tl.constexpr,
    FIRST: tl.constexpr,
    HAS_OUTER: tl.constexpr,
    FINITE: tl.constexpr,
    HALF: tl.constexpr,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    NBYTES: tl.constexpr,
    GROUPS: tl.constexpr,
):
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)  # packing groups
    offs = g[:, None] * PER + tl.arange(0, PER)[None, :]
    mask = offs < n
    big = tl.load(delta_ptr) * 12582912.0  # 1.5 * 2^23 * delta
    x = rounded(u_ptr, m_ptr, offs, mask, big, HAS_M)
    xc = tl.load(c_ptr + offs, mask=mask, other=0.0)
    if D == 1:
        x = x + tl.load(p_ptr + offs, mask=mask, other=0.0)
    elif not FIRST:
        y = (tl.load(p_ptr + offs, mask=mask, other=0.0) - xc) + big  # D * delta + BIG
        bits = y.to(tl.int32, bitcast=True)
        rem = bits & (D - 1)  # D mod d (0 in the masked lanes: BIG / delta is a multiple)
        q = (bits & -D).to(tl.float32, bitcast=True) - big  # d * floor(D / d) * delta
        x = x + q * (1.0 / D)
        word = tl.sum(rem << (tl.arange(0, PER) * BITS)[None, :], axis=1)
        gmask = g * PER < n
        for j in tl.static_range(NBYTES):
            tl.store(
                packed_ptr + g * NBYTES + j, ((word >> (8 * j)) & 255).to(tl.uint8), mask=gmask
            )
    if HAS_OUTER:
        x = x + outer * xc
    tl.store(out_ptr + offs, x, mask=mask)
    if HALF:
        tl.store(half_ptr + offs, bf16_bits(x), mask=mask)
    a = tl.abs(x)
    if FINITE:
        a = tl.where(a <= _MAX_FINITE, a, 0.0)  # NaN and inf: not counted
    tl.atomic_max(top_ptr, tl.max(tl.max(a.to(tl.int32, bitcast=True), axis=1), axis=0))


@triton.jit
def prev_kernel(
    u_ptr,
    m_ptr,
    c_ptr,
    n_ptr,
    packed_ptr,
    delta_ptr,
    out_ptr,
    n,
    outer,
    D: tl.constexpr,
    HAS_M: tl.constexpr,
    HAS_PACKED: tl.constexpr,
    HAS_OUTER: tl.constexpr,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    NBYTES: tl.constexpr,
    GROUPS: tl.constexpr,
):
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    offs = g[:, None] * PER + tl.arange(0, PER)[None, :]
    mask = offs < n
    big = tl.load(delta_ptr) * 12582912.0
    xc = tl.load(c_ptr + offs, mask=mask, other=0.0)
    x = tl.load(n_ptr + offs, mask=mask, other=0.0)
    x = x - rounded(u_ptr, m_ptr, offs, mask, big, HAS_M)
    if HAS_OUTER:
        x = x - outer * xc
    if D > 1:  # x = floor(D / d) * delta
        x = x * D + big
        if HAS_PACKED:
            gmask = g * PER < n
            word = tl.zeros([GROUPS], dtype=tl.int32)
            for j in tl.static_range(NBYTES):
                b = tl.load(packed_ptr + g * NBYTES + j, mask=gmask, other=0)
                word = word | (b.to(tl.int32) << (8 * j))
            rem = (word[:, None] >> (tl.arange(0, PER) * BITS)[None, :]) & ((1 << BITS) - 1)
            x = (x.to(tl.int32, bitcast=True) | rem).to(tl.float32, bitcast=True)
        x = (x - big) + xc
    tl.store(out_ptr + offs, x, mask=mask)


@triton.jit
def adjoint_kernel(dx_ptr, a_ptr, b_ptr, out_ptr, n, ca, cb, HAS_B: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = acc + ca * tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        acc = acc + cb * tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, bf16_bits(acc), mask=mask)


@triton.jit
def split_kernel(x_ptr, hi_ptr, rest_ptr, n, BLOCK: tl.constexpr):
    """A float32 (read as int32 bits) as bf16 ties away from zero and the int16 rest
    (NOTE [ bf16 stage output ] in coupling.py): the integer arithmetic of _exact.split_bf16."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = tl.load(x_ptr + offs, mask=mask, other=0)
    top = (bits + 0x8000) >> 16
    x = bits.to(tl.float32, bitcast=True)
    hi = tl.where(x != x, 0x7FC0, top)  # NaN: bf16's NaN
    tl.store(hi_ptr + offs, hi.to(tl.int16), mask=mask)
    tl.store(rest_ptr + offs, (bits - (top << 16)).to(tl.int16), mask=mask)


@triton.jit
def join_kernel(hi_ptr, rest_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    hi = tl.load(hi_ptr + offs, mask=mask, other=0).to(tl.int32)
    rest = tl.load(rest_ptr + offs, mask=mask, other=0).to(tl.int32)
    tl.store(out_ptr + offs, (hi << 16) + rest, mask=mask)


@triton.jit
def _pow2(k):
    """2^k as fp32, for -126 < k < 128, from the exponent bits: exact."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _grid_exponent(top_ptr, offset, floor):
    """e + offset with 2^(e-1) <= max(top, floor) < 2^e, and 0 + offset for a top that is not
    finite (what torch.frexp gives): _exact._step's exponent."""
    t = tl.load(top_ptr)
    t = tl.where(t < floor, floor, t)  # clamp_min; a NaN stays
    biased = (t.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.where(biased == 0xFF, 0, biased - 126) + offset


@triton.jit
def on_grid(v, delta):
    """v (fp32) rounded to the nearest multiple of delta, ties to even, zeros keeping their sign
    (_exact.on_grid: v / delta rounded, times delta)."""
    inv = ((254 << 23) - delta.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)  # 1/delta
    q = v * inv  # exact: a power of 2
    r = (q + 12582912.0) - 12582912.0  # to the nearest integer, ties to even (|q| < 2^22)
    r = tl.where(r == 0, q * 0.0, r)  # the sign of a zero, as round() keeps it
    return r * delta


@triton.jit
def entry_kernel(x_ptr, top_ptr, delta_ptr, out_ptr, acc_ptr, half_ptr, n, offset, floor,
                 HALF: tl.constexpr, BLOCK: tl.constexpr):
    """A stage's first entry: the grid from top = max |x| (_exact.first_grid), x in fp32
    rounded onto it, max |x_0| (the rounding of top: rounding is monotonic and symmetric) and
    x_0 in bf16."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    delta = _pow2(_grid_exponent(top_ptr, offset, floor))
    x0 = on_grid(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), delta)
    tl.store(out_ptr + offs, x0, mask=mask)
    if HALF:
        tl.store(half_ptr + offs, bf16_bits(x0), mask=mask)
    if pid == 0:
        tl.store(delta_ptr, delta)
        tl.store(acc_ptr, tl.abs(on_grid(tl.load(top_ptr), delta)))
