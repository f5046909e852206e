"""The one direction generator: a counter-based hash of (seed, element index), in plain integer tensor ops.

Every party that must agree on a direction z (the server, each simulated client, an ExecuTorch program on a
phone) computes it with these functions, so z is a pure function of an integer seed, bit for bit:

* bits(seed, i) = h(h(i XOR k1) XOR k2), with k1 = h(seed XOR C), k2 = h(k1 + C2), and h Wellons' "lowbias32"
  integer hash. All values are uint32 held in int64; multiplication mod 2^32 is split into 16-bit halves so
  no product leaves int64 (no overflow, hence the same result in any runtime that has int64 mul/and/xor/shift).
* Gaussian z: the top 16 bits index a table of the 65,536 mid-point quantiles of N(0, 1) (rescaled to unit
  variance). A table gather has no transcendental function whose last bit could differ between ATen,
  ExecuTorch's portable kernels or a phone's libm. Rademacher z: the top bit picks -1 or +1.

Seeds are integers in [0, 2^32). :func:`derive_seed` maps (round seed, client, step, direction) to a seed, so
seeds need not travel at all.
"""

from __future__ import annotations

from functools import lru_cache

import torch

MASK32 = 0xFFFFFFFF
SEED_LIMIT = 1 << 32
DISTRIBUTIONS = ("gaussian", "rademacher")
TABLE_BITS = 16
_CHUNK_ELEMENTS = 1 << 17
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_C1, _C2 = 0x9E3779B9, 0x632BE5AB


def _mulmod32_(x: torch.Tensor, m: int) -> torch.Tensor:
    """x * m mod 2^32 in place, for 0 <= x < 2^32: both partial products stay below 2^48."""
    lo, hi = m & 0xFFFF, m >> 16
    high = torch.bitwise_left_shift(torch.bitwise_and(x * hi, 0xFFFF), 16)
    return x.mul_(lo).add_(high).bitwise_and_(MASK32)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bitwise_right_shift(x, k)  # logical, as the values are non-negative


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (``x`` itself is not modified)."""
    x = torch.bitwise_xor(x, _shr(x, 16))
    x = _mulmod32_(x, _M1)
    x.bitwise_xor_(_shr(x, 15))
    x = _mulmod32_(x, _M2)
    return x.bitwise_xor_(_shr(x, 16))


def hash32_int(x: int) -> int:
    """The same hash on a Python int (for seed derivation on hosts)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def bits(seeds: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """uint32 stream (as int64) of shape seeds.shape + (n,), for counters offset .. offset+n-1."""
    seeds = seeds.to(torch.int64).unsqueeze(-1)
    k1 = hash32(torch.bitwise_xor(seeds, _C1))
    k2 = hash32((k1 + _C2).bitwise_and(MASK32))
    counter = torch.arange(offset, offset + n, dtype=torch.int64)
    return hash32(torch.bitwise_xor(hash32(torch.bitwise_xor(counter, k1)), k2))


@lru_cache(maxsize=1)
def gaussian_table() -> torch.Tensor:
    """The 2^16 mid-point quantiles of N(0,1), rescaled to exactly unit second moment, float32."""
    n = 1 << TABLE_BITS
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = torch.special.ndtri(p)
    t = t / t.square().mean().sqrt()
    return t.to(torch.float32)


def directions_from_bits(b: torch.Tensor, distribution: str, table: torch.Tensor) -> torch.Tensor:
    """Map hash bits to direction entries (shared by :func:`directions` and exported programs)."""
    if distribution == "gaussian":
        return table[_shr(b, 32 - TABLE_BITS)]
    return (_shr(b, 31) * 2 - 1).to(torch.float32)


def directions(seeds: torch.Tensor | list[int] | tuple[int, ...], n: int, distribution: str = "gaussian"):
    """Directions z of shape (len(seeds), n), float32; row k is a pure function of seeds[k]."""
    check_distribution(distribution)
    s = torch.as_tensor(list(seeds) if not isinstance(seeds, torch.Tensor) else seeds, dtype=torch.int64)
    check_seeds(s)
    out = torch.empty(len(s), n, dtype=torch.float32)
    step = max(1024, _CHUNK_ELEMENTS // max(1, len(s)))  # cache-sized pieces: ~10x faster than one big pass
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[:, start:stop] = directions_from_bits(bits(s, stop - start, start), distribution, gaussian_table())
    return out


def uniform(seed: int, n: int) -> torch.Tensor:
    """n float32 values, exactly representable, uniform in (0, 1); used for the frozen A init."""
    b = bits(torch.tensor([seed], dtype=torch.int64), n)[0]
    return ((_shr(b, 8).to(torch.float64) + 0.5) / (1 << 24)).to(torch.float32)


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2^32) from integers (e.g. run seed, round, client, step, direction index)."""
    h = 0x2545F491
    for p in parts:
        if p < 0:
            raise ValueError(f"seed parts must be non-negative integers, got {p}")
        h = hash32_int(h ^ hash32_int(p & MASK32) ^ hash32_int((p >> 32) + 0x51ED27))
    return h


def check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r} is not supported; choose one of {DISTRIBUTIONS}")


def check_seeds(seeds: torch.Tensor) -> None:
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= SEED_LIMIT):
        bad = seeds[(seeds < 0) | (seeds >= SEED_LIMIT)][0].item()
        raise ValueError(f"seed {bad} is out of range; seeds must be integers in [0, 2**32)")
