"""A run's B as a standard PEFT adapter, a merged model and an inference .pte: same logits as fedprge's forward."""

from __future__ import annotations

import json

import pytest
import torch

from fedprge.config import load_config, to_yaml
from fedprge.engine.adapters import LoRAFA
from fedprge.export.cli import main
from fedprge.export.peft_adapters import export_run, load_base
from fedprge.export.run_folder import load_run, save_personal_b

PARTITION = 1
SUMMARY = {
    "metric": "loss",
    "higher_is_better": False,
    "methods": {
        "untuned": {"mean": 10.82, "median": 10.81, "worst10": 10.9},
        "global": {"mean": 10.80, "median": 10.79, "worst10": 10.88},
    },
    "clients_evaluated": 4,
    "bytes": {"train_up": 1234, "train_down": 5678},
    "uplink_bytes_per_client_round": 101.0,
    "downlink_bytes_per_client_round": 202.0,
    "adapter_bytes_fp32": 6144,
    "rounds": 3,
}


@pytest.fixture(scope="module")
def cfg():
    return load_config(["configs/smoke.yaml"])


@pytest.fixture(scope="module")
def fedprge_model(cfg):
    """The run's base model with fedprge's own LoRA-FA layers: the reference forward."""
    model, tokenizer = load_base(cfg)
    return model, LoRAFA(model, cfg.lora_config()), tokenizer


def random_b(num_params: int, seed: int) -> torch.Tensor:
    return 0.5 * torch.randn(num_params, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def run_dir(cfg, fedprge_model, tmp_path_factory):
    """A run folder as a finished run leaves it, with a random nonzero global B and one personal B."""
    _, lora, _ = fedprge_model
    d = tmp_path_factory.mktemp("run")
    (d / "config.yaml").write_text(to_yaml(cfg))
    torch.save(random_b(lora.num_params, 0), d / "global_b.pt")
    (d / "summary.json").write_text(json.dumps(SUMMARY))
    save_personal_b(d, PARTITION, random_b(lora.num_params, 1))
    return d


@pytest.fixture(scope="module")
def exported(run_dir):
    return export_run(run_dir, merged=True)


def batch(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(
        ["To be, or not to be: that is the question", "Friends, Romans"], return_tensors="pt", padding=True
    )


def fedprge_logits(fedprge_model, b: torch.Tensor) -> torch.Tensor:
    model, lora, tokenizer = fedprge_model
    with torch.no_grad(), lora.use(b):
        return model(**batch(tokenizer)).logits


def peft_logits(cfg, folder, tokenizer) -> torch.Tensor:
    from peft import PeftModel

    base, _ = load_base(cfg)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return model(**batch(tokenizer)).logits


def test_global_adapter_gives_fedprge_logits(cfg, fedprge_model, run_dir, exported):
    folder = exported.adapters["global"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16.0, ["q_proj", "v_proj"])
    b = torch.load(run_dir / "global_b.pt")
    want = fedprge_logits(fedprge_model, b)
    assert (want - fedprge_logits(fedprge_model, torch.zeros_like(b))).abs().max() > 1e-2  # B matters
    torch.testing.assert_close(peft_logits(cfg, folder, fedprge_model[2]), want, rtol=0, atol=1e-5)


def test_personal_adapter_gives_fedprge_logits(cfg, fedprge_model, run_dir, exported):
    assert sorted(exported.adapters) == [f"client-{PARTITION}", "global"]
    want = fedprge_logits(fedprge_model, load_run(run_dir).personal[PARTITION])
    got = peft_logits(cfg, exported.adapters[f"client-{PARTITION}"], fedprge_model[2])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_merged_model_gives_fedprge_logits(fedprge_model, run_dir, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(exported.merged)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(exported.merged))
    assert tokenizer("Hello")["input_ids"] == fedprge_model[2]("Hello")["input_ids"]
    with torch.no_grad():
        got = merged(**batch(fedprge_model[2])).logits
    torch.testing.assert_close(
        got, fedprge_logits(fedprge_model, torch.load(run_dir / "global_b.pt")), rtol=0, atol=1e-5
    )


def test_model_card_names_run_metrics_and_config_hash(run_dir, exported):
    import hashlib

    card = (exported.adapters["global"] / "README.md").read_text()
    assert hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest() in card
    assert "| global | the federation's global B | 10.8000 | 10.7900 | 10.8800 |" in card
    assert "3 of 3 rounds" in card and "1,234 up" in card and "`tiny`" in card
    assert "personal B of client 1" in (exported.adapters["client-1"] / "README.md").read_text()
    assert "merge_and_unload" in (exported.merged / "README.md").read_text()


def test_unfinished_run_exports_its_checkpoint(cfg, fedprge_model, tmp_path):
    from fedprge.federation import checkpoint

    b = random_b(fedprge_model[1].num_params, 2)
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    checkpoint.save(tmp_path / checkpoint.NAME, {"config": to_yaml(cfg), "round": 2, "strategy": {"b": b}})
    for where in (tmp_path, tmp_path / checkpoint.NAME):
        state = load_run(where)
        assert (state.rounds, state.finished) == (2, False) and torch.equal(state.b, b)
    assert "2 of 3 rounds (unfinished run" in (export_run(tmp_path).adapters["global"] / "README.md").read_text()


def test_bad_inputs_fail_with_one_line_naming_the_value(cfg, run_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"'.*nowhere' does not exist; expected a run folder"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(ValueError, match="has no finished round"):
        load_run(tmp_path)
    torch.save(torch.ones(100), tmp_path / "global_b.pt")
    with pytest.raises(ValueError, match=r"B has 100 entries but model.name='tiny' .* needs 1536"):
        export_run(tmp_path)
    assert not (tmp_path / "adapters").exists()
    torch.save(torch.load(run_dir / "global_b.pt"), tmp_path / "global_b.pt")
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(["configs/smoke.yaml"], ["lora.rank=4"])))
    with pytest.raises(ValueError, match=r"B has 1536 entries but .* lora rank 4 .* needs 768"):
        export_run(tmp_path)
    assert main(["adapters", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run folder") and err.count("\n") == 1


def test_cli_writes_adapters(run_dir, tmp_path, capsys):
    assert main(["adapters", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "global" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / f"client-{PARTITION}" / "adapter_config.json").is_file()
    assert "wrote global adapter" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["portable", pytest.param("xnnpack", marks=pytest.mark.slow)])
def test_inference_pte_generates_what_transformers_generates(fedprge_model, run_dir, tmp_path, backend):
    pytest.importorskip("executorch")
    from transformers import AutoModelForCausalLM

    from fedprge.export.inference import InferencePTE, generate

    result = export_run(run_dir, tmp_path, pte=True, backend=backend, max_len=32)
    tokenizer = fedprge_model[2]
    prompt = "Friends, Romans, countrymen"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    program = InferencePTE(result.pte, num_threads=1)
    model, lora, _ = fedprge_model
    with torch.no_grad(), lora.use(torch.load(run_dir / "global_b.pt")):
        last = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(program.next_logits(ids[0].tolist()), last, rtol=0, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(str(result.merged)).eval()
    n = 8
    with torch.no_grad():
        expected = merged.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = expected[0, ids.shape[1] :].tolist()
    assert program.generate_ids(ids[0].tolist(), n, tokenizer.eos_token_id) == expected
    assert generate(program, tokenizer, prompt, n) == tokenizer.decode(expected, skip_special_tokens=True)


def run_folder_for(folder, cfg, b: torch.Tensor):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    torch.save(b, folder / "global_b.pt")
    return folder


def test_local_model_folder_adapter_names_its_base_and_matches(fedprge_model, tmp_path):
    _, lora, tokenizer = fedprge_model
    base_dir = tmp_path / "base"
    base, _ = load_base(load_config(["configs/smoke.yaml"]))  # the same tiny weights, as a model folder
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    cfg = load_config(["configs/smoke.yaml"], [f"model.name={base_dir}"])
    b = random_b(lora.num_params, 3)
    result = export_run(run_folder_for(tmp_path / "run", cfg, b))
    config = json.loads((result.adapters["global"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    got = peft_logits(cfg, result.adapters["global"], tokenizer)
    torch.testing.assert_close(got, fedprge_logits(fedprge_model, b), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_adapter_and_merged_model_give_fedprge_logits(tmp_path):
    """Real SmolLM2-135M (P = 184,320): ~30 s here; its inference .pte export takes minutes, so it is not here."""
    from transformers import AutoModelForCausalLM

    cfg = load_config([], ["model.name=smollm2"])
    model, tokenizer = load_base(cfg)
    lora = LoRAFA(model, cfg.lora_config())
    b = 0.02 * torch.randn(lora.num_params, generator=torch.Generator().manual_seed(0))
    result = export_run(run_folder_for(tmp_path / "run", cfg, b), merged=True)
    with torch.no_grad(), lora.use(b):
        want = model(**batch(tokenizer)).logits
    torch.testing.assert_close(peft_logits(cfg, result.adapters["global"], tokenizer), want, rtol=0, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(result.merged)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch(tokenizer)).logits, want, rtol=0, atol=1e-3)
