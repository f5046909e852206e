"""Test vectors for a phone implementation of the protocol's seed derivation and direction generator.

    python clients/vectors.py --out vectors/

writes ``vectors/gaussian_table.f32`` (the 65,536 float32 table, little-endian: ship it with the app, do not
recompute it) and ``vectors/vectors.json`` (hash32, derive_seed, step seeds, raw bits and direction entries for a
few seeds, including far counters). A Kotlin/Swift implementation is correct when it reproduces every value
exactly (floats compare by their float32 bit patterns, given as hex). docs/devices.md spells out the algorithms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fedprge.engine import rng
from fedprge.engine.seeds import SeedSpec, step_seeds

SEEDS = (0, 7, 123456789, 2**32 - 1)
COUNTERS = (0, 1, 2, 3, 1000, 184319, 1_000_000, 2**31 + 5)


def f32_hex(x: float) -> str:
    return f"0x{np.float32(x).view(np.uint32):08x}"


def vectors() -> dict:
    table = rng.gaussian_table()
    out: dict = {
        "hash32": {str(x): rng.hash32_int(x) for x in (0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF)},
        "derive_seed": [
            {"parts": list(p), "seed": rng.derive_seed(*p)}
            for p in ((0,), (0, 1), (0, 1, 1, 0, 0, 0), (12345, 1, 3, 7, 2, 1), (2**32,), (2**40 + 5, 3))
        ],
        "step_seeds": [
            {"run_seed": s, "q": 4, "scope": scope, "round": r, "partition": p, "step": t, "seeds": seeds}
            for s, scope, r, p, t in ((0, "client", 1, 3, 0), (0, "client", 2, 0, 9), (42, "round", 1, 5, 0))
            for seeds in [step_seeds(SeedSpec(s, 4, scope), r, p, t)]
        ],
        "gaussian_table": {
            "file": "gaussian_table.f32",
            "sha256": hashlib.sha256(table.numpy().astype("<f4").tobytes()).hexdigest(),
            "entries": {str(i): f32_hex(table[i].item()) for i in (0, 1, 32767, 32768, 65534, 65535)},
        },
        "directions": [],
    }
    for seed in SEEDS:
        s = torch.tensor([seed], dtype=torch.int64)
        rows = []
        for c in COUNTERS:
            b = int(rng.bits(s, 1, c)[0, 0])
            g = rng.directions_from_bits(torch.tensor([b]), "gaussian", table)[0].item()
            r = rng.directions_from_bits(torch.tensor([b]), "rademacher", table)[0].item()
            rows.append({"counter": c, "bits": b, "gaussian": f32_hex(g), "rademacher": int(r)})
        k1 = rng.hash32_int(seed ^ 0x9E3779B9)
        out["directions"].append({"seed": seed, "k1": k1, "k2": rng.hash32_int(k1 + 0x632BE5AB), "entries": rows})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="vectors", help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gaussian_table.f32").write_bytes(rng.gaussian_table().numpy().astype("<f4").tobytes())
    (out / "vectors.json").write_text(json.dumps(vectors(), indent=1) + "\n")
    print(f"wrote {out / 'gaussian_table.f32'} and {out / 'vectors.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
