"""The seed table: every domain distinct and pinned, since clients, server and phones derive the same seeds."""

from __future__ import annotations

from fedprge.engine import seeds
from fedprge.engine.seeds import SeedSpec, private_seeds, step_seeds


def test_every_domain_keeps_its_number():
    domains = {name: value for name, value in vars(seeds).items() if name.isupper()}
    assert domains == {
        "CLIENT_SCOPE": 1,
        "ROUND_SCOPE": 2,
        "POOL_INDEX": 3,
        "POOL_SEED": 4,
        "BATCH": 5,
        "PERSONAL": 6,
        "DROP": 7,
        "STRAGGLE": 8,
        "POISON": 9,
        "EVAL_FAULT": 10,
        "DITTO": 11,
        "UNSEEN": 12,
        "DP_NOISE": 13,
        "SECAGG_ROUNDING": 14,
    }


def test_step_and_private_seeds_are_pinned():
    assert step_seeds(SeedSpec(0, 4, "client"), 1, 3, 0) == [2438593231, 1958253472, 570114558, 3908649141]
    assert step_seeds(SeedSpec(0, 4, "client"), 1, 3, 0) == private_seeds(0, seeds.CLIENT_SCOPE, 1, 3, 0, 4)
    assert private_seeds(0, seeds.PERSONAL, 1, 3, 0, 4) != private_seeds(0, seeds.DITTO, 1, 3, 0, 4)
