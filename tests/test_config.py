import pytest

from fedprge.config import from_yaml, load_config, to_yaml


def test_defaults_overrides_and_yaml_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("federation:\n  clients: 7\nzo:\n  q: 2\n")
    cfg = load_config([f], ["zo.q=8", "federation.downlink=pool"])
    assert (cfg.federation.clients, cfg.zo.q, cfg.federation.downlink) == (7, 8, "pool")
    assert from_yaml(to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("zo.eps=0", "eps=0"),
        ("zo.q=0", "q=0"),
        ("lora.rank=0", "rank=0"),
        ("federation.fraction=1.5", "federation.fraction=1.5"),
        ("federation.downlink=dense", "federation.downlink='dense'.*weights"),
        ("data.partition=random", "data.partition='random'"),
        ("eval.personalization=[global,clustered]", "clustered"),
        ("federation.clients=many", "federation.clients"),
        ("federation.nope=1", "nope"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([], [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        load_config([tmp_path / "nothere.yaml"])
