"""Property-based tests (hypothesis): message decoding and config validation never fail in an unexpected way.

* Decoding whatever a peer could send (arbitrary bytes, lists, records) either works or raises ValueError.
* Encoding then decoding is exact, bit for bit (NaN payloads included).
* Any value for any numeric config key either validates or raises ValueError naming that key.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedprge.config import RunConfig, load_config
from fedprge.federation.protocol import (
    GlobalState,
    RoundUpdate,
    decode_grads,
    pack_f32,
    pack_u32,
    unpack_f32,
    unpack_u32,
)

# derandomize: the same examples every run, so a CI result never hangs on a random draw
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# what a ConfigRecord may hold: scalars of its five types and homogeneous lists of them
_scalars = [
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=64),
    st.booleans(),
]
config_values = st.one_of(*_scalars, *[st.lists(s, max_size=8) for s in _scalars])
anything = st.one_of(config_values, st.none(), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
KEYS = ["rounds", "sizes", "seeds", "coefs", "b", "projected_grads", "other"]
f32 = arrays(np.float32, st.integers(0, 64), elements=st.floats(width=32, allow_nan=True, allow_infinity=True))


@SETTINGS
@given(anything)
def test_unpacking_anything_raises_only_value_error(data):
    for unpack in (unpack_f32, unpack_u32):
        try:
            out = unpack(data)
        except ValueError:
            continue
        assert isinstance(data, bytes) and len(out) == len(data) // 4


@SETTINGS
@given(f32)
def test_float32_round_trip_is_bit_exact(values):
    assert unpack_f32(pack_f32(values)).tobytes() == values.astype("<f4").tobytes()


@SETTINGS
@given(st.lists(st.integers(0, 2**32 - 1), max_size=64))
def test_uint32_round_trip_is_exact(values):
    assert unpack_u32(pack_u32(values)) == values


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), config_values, max_size=5), st.integers(1, 6), st.integers(1, 6))
def test_decode_grads_of_any_record_is_a_correct_shape_or_a_value_error(fields, steps, q):
    try:
        g = decode_grads(ConfigRecord(fields), steps, q)
    except ValueError:
        return
    assert g.shape == (steps, q) and g.dtype == np.float32


@SETTINGS
@given(
    st.sampled_from(["weights", "seeds", "pool", "dense", ""]),
    st.dictionaries(st.sampled_from(KEYS), config_values, max_size=6),
)
def test_global_state_from_any_config_record_raises_only_value_error(kind, fields):
    try:
        state = GlobalState.from_record(kind, ConfigRecord(fields))
    except ValueError:
        return
    if kind == "seeds":
        assert sum(len(u.seeds) for u in state.updates) == sum(len(u.coefs) for u in state.updates)
        assert all(b.rnd > a.rnd >= 1 for a, b in zip(state.updates, state.updates[1:], strict=False))


@SETTINGS
@given(
    st.sampled_from(["float32", "float64", "int8", "complex64", "<U3", "bogus"]),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]),
    st.binary(max_size=128),
)
def test_weights_state_from_any_array_raises_only_value_error(dtype, shape, stype, data):
    rec = ArrayRecord(array_dict={"b": Array(dtype=dtype, shape=shape, stype=stype, data=data)})
    try:
        state = GlobalState.from_record("weights", rec)
    except ValueError:
        return
    assert state.b.dtype == torch.float32 and state.b.dim() == 1


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(1, 3), st.lists(st.tuples(st.integers(0, 2**32 - 1), st.floats(width=32)), max_size=6)),
        max_size=5,
    )
)
def test_seed_state_round_trip_is_exact(steps):
    rnd, updates = 0, []
    for gap, entries in steps:
        rnd += gap
        updates.append(RoundUpdate(rnd, [s for s, _ in entries], np.array([c for _, c in entries], np.float32)))
    back = GlobalState.from_record("seeds", GlobalState("seeds", updates=updates).to_record())
    assert [(u.rnd, u.seeds, u.coefs.tobytes()) for u in back.updates] == [
        (u.rnd, u.seeds, u.coefs.tobytes()) for u in updates
    ]


@SETTINGS
@given(f32)
def test_weights_and_pool_round_trips_are_bit_exact(values):
    w = GlobalState.from_record("weights", GlobalState("weights", b=torch.from_numpy(values)).to_record())
    assert w.b.numpy().tobytes() == values.tobytes()
    p = GlobalState.from_record("pool", GlobalState("pool", pool_coefs=values).to_record())
    assert p.pool_coefs.tobytes() == values.tobytes()


# --- config validation ----------------------------------------------------------------------------------------
def _numeric_keys() -> dict[str, str]:
    """Every int/float key of the run config, dotted (sections are dataclass fields with a default_factory)."""
    keys = {}
    for section in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(section.default_factory):
            keys.update({f"{section.name}.{f.name}": f.type for f in dataclasses.fields(section.default_factory)})
        else:
            keys[section.name] = section.type
    return {k: t for k, t in keys.items() if t in ("int", "float")}


NUMERIC = _numeric_keys()
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 100),
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(NUMERIC)), numbers, min_size=1, max_size=3))
def test_any_numeric_value_validates_or_names_its_key(values):
    overrides = [f"{k}={v!r}" for k, v in values.items()]
    try:
        cfg = load_config([], overrides)
    except ValueError as e:
        # the key as a whole dotted name: "seed" must not match inside "lora.a_seed", nor "rank" inside "lora.rank"
        named = [k for k in values if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", str(e))]
        assert named, f"{overrides}: {e}"
        return
    for key, value in values.items():  # what validated is what was asked for
        section, _, name = key.rpartition(".")
        got = getattr(getattr(cfg, section) if section else cfg, name)
        value = float(value) if NUMERIC[key] == "float" else value  # an int for a float key is that float
        assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.rank=0", "lora.rank"),
        ("zo.q=0", "zo.q"),
        ("zo.eps=nan", "zo.eps"),
        ("zo.lr=inf", "zo.lr"),
        ("data.chunk_words=0", "data.chunk_words"),
        ("data.max_train_per_client=0", "data.max_train_per_client"),
        ("eval.max_clients=-1", "eval.max_clients"),
        ("seed=18446744073709551616", "seed"),
    ],
)
def test_keys_that_hypothesis_found_unchecked_are_named(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config([], [override])
