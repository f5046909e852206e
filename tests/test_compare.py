"""python -m fedprge.compare on the tiny model: real runs of several methods, and the byte calculator against them."""

import csv
import json

import pytest

from fedprge.calculator import model_shapes, predict
from fedprge.compare import main
from fedprge.config import load_config

SMOKE = ["--config", "configs/smoke.yaml", "eval.curve_clients=0"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    methods = ["prge-seeds", "prge-weights", "prge-pool", "fedavg-lora-fa", "fedavg-full"]
    over = ["federation.clients=4", "federation.fraction=0.5", "federation.rounds=3"]
    assert main([*SMOKE, "--methods", *methods, "--out", str(out), *over]) == 0
    with open(out / "compare.csv") as f:
        return out, {r["method"]: r for r in csv.DictReader(f)}


def test_compare_writes_table_markdown_json_and_plot(compared):
    out, rows = compared
    assert set(rows) == {"prge-seeds", "prge-weights", "prge-pool", "fedavg-lora-fa", "fedavg-full"}
    assert (out / "compare.png").stat().st_size > 10_000
    assert "x smaller than FedAvg B" in (out / "compare.md").read_text()
    assert len(json.loads((out / "compare.json").read_text())) == 5
    up = {m: float(r["uplink_per_client_round"]) for m, r in rows.items()}
    assert up["prge-weights"] < up["fedavg-lora-fa"] < up["fedavg-full"]
    # the target is the level every method reached, so every method has a bytes-to-target figure
    assert all(r["bytes_to_target"] != "nan" for r in rows.values()), rows
    # a simulated client's process (a Ray worker holding the model) was sampled
    assert all(100 < float(r["client_peak_mib"]) < 24_000 for r in rows.values()), rows


def test_calculator_matches_measured_bytes_within_5_percent(compared):
    _, rows = compared
    cfg = load_config(
        ["configs/smoke.yaml"], ["federation.clients=4", "federation.fraction=0.5", "federation.rounds=3"]
    )
    predicted = {r["method"]: r for r in predict("tiny", cfg)}
    for method, measured in rows.items():
        for key in ("uplink_per_client_round", "downlink_per_client_round"):
            p, m = predicted[method][key], float(measured[key])
            assert abs(p - m) <= 0.05 * m, (method, key, p, m)


@pytest.mark.slow
def test_prge_uplink_is_over_1000x_smaller_than_fedavg_of_lora_fa_on_smollm2():
    cfg = load_config([], [])
    rows = {r["method"]: r for r in predict("smollm2", cfg)}
    ratio = rows["fedavg-lora-fa"]["uplink_per_client_round"] / rows["prge-seeds"]["uplink_per_client_round"]
    assert ratio > 1000
    assert model_shapes("smollm2", cfg).lora_b == 184_320
