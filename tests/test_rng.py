import hashlib
import subprocess
import sys

import pytest
import torch

from fedprge.engine import rng

SCRIPT = (
    "import hashlib, torch; from fedprge.engine import rng; "
    "z = rng.directions([0, 1, 2**32 - 1, 123456789], 50_000, '{dist}'); "
    "print(hashlib.sha256(z.numpy().tobytes()).hexdigest())"
)


@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
def test_directions_bit_identical_across_processes(dist):
    here = hashlib.sha256(rng.directions([0, 1, 2**32 - 1, 123456789], 50_000, dist).numpy().tobytes()).hexdigest()
    digests = {
        subprocess.run(
            [sys.executable, "-c", SCRIPT.format(dist=dist)],
            capture_output=True,
            text=True,
            check=True,
            env={"OMP_NUM_THREADS": str(n), "PATH": ""},
        ).stdout.strip()
        for n in (1, 2)
    }
    assert digests == {here}


def test_rows_depend_only_on_their_seed():
    a = rng.directions([5, 6, 7], 1000)
    b = rng.directions([7], 1000)
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    # a prefix of a longer stream is the shorter stream (counter-based)
    assert torch.equal(rng.directions([5], 300)[0], a[0, :300])


def test_gaussian_moments_and_independence():
    z = rng.directions(list(range(8)), 200_000)
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1) < 0.01
    corr = torch.corrcoef(z)
    assert (corr - torch.eye(8)).abs().max() < 0.01
    # tails exist (table reaches beyond 4 sigma), symmetric
    assert z.max() > 4 and z.min() < -4


def test_rademacher_is_balanced_signs():
    z = rng.directions([3, 4], 100_000, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.01


def test_tensor_hash_matches_python_hash():
    xs = torch.randint(0, 2**32, (2000,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    assert rng.hash32(xs).tolist() == [rng.hash32_int(x) for x in xs.tolist()]


def test_derive_seed_is_pinned_order_and_length_sensitive_and_spread():
    # Seeds never travel: a deployed client and the server must derive the same ones, so the values are part of the
    # protocol (docs/devices.md) and pinned here; a change to the mixing constants or the loop changes them.
    assert [rng.derive_seed(7, 1, 2), rng.derive_seed(), rng.derive_seed(5)] == [992981802, 625341585, 2816560325]
    assert rng.derive_seed(7, 1, 2) != rng.derive_seed(7, 2, 1)  # the order of the parts matters
    assert rng.derive_seed(7, 1) != rng.derive_seed(7, 1, 0)  # so does their number (a trailing 0 is a part)
    assert rng.derive_seed(2**32 + 5) == 1182899788 != rng.derive_seed(5)  # the high 32 bits of a part count
    seeds = {rng.derive_seed(7, r, c, s) for r in range(5) for c in range(20) for s in range(10)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**32 for s in seeds)
    # spread: the top and the bottom bit are each set about half the time (binomial sd over 1000 draws: 16)
    assert abs(sum(s >> 31 for s in seeds) - 500) < 80 and abs(sum(s & 1 for s in seeds) - 500) < 80


def test_uniform_is_pinned_and_inside_the_open_unit_interval():
    """The frozen A is drawn from it on every party: values pinned, and never exactly 0 or 1."""
    pinned = [0.588408350944519, 0.07809469103813171, 0.1451391875743866, 0.7665778398513794]
    assert rng.uniform(3, 4).tolist() == pinned
    u = rng.uniform(11, 200_000)
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005


def test_bad_seeds_and_distribution_are_rejected():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        rng.directions([2**32], 10)
    with pytest.raises(ValueError, match="-1"):
        rng.directions([-1], 10)
    with pytest.raises(ValueError, match="seed 4294967296 is out of range"):  # 0 is a valid seed, not the bad one
        rng.directions([0, 1, 2**32], 10)
    rng.directions([0], 10)
    with pytest.raises(ValueError, match="'uniform'.*gaussian"):
        rng.directions([1], 10, "uniform")
    with pytest.raises(ValueError, match="non-negative"):
        rng.derive_seed(1, -2)


def test_bits_of_a_seed_array_has_the_seeds_shape_plus_the_stream():
    """bits(seeds, n, offset): shape seeds.shape + (n,), every stream a function of its seed and counter only."""
    seeds = torch.tensor([[1, 2, 3], [4, 5, 2**32 - 1]])
    out = rng.bits(seeds, 6, offset=10)
    assert out.shape == (2, 3, 6)
    assert torch.equal(out[1, 2], rng.bits(torch.tensor([2**32 - 1]), 16)[0, 10:])
    assert torch.equal(out[0, 1], rng.bits(torch.tensor([2]), 6, offset=10)[0])
