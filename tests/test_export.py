"""The P-RGE step as an ExecuTorch program: in-program directions and losses match the host's, per backend."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("executorch")

from fedprge.engine import rng  # noqa: E402
from fedprge.engine.backend import EagerBackend  # noqa: E402
from fedprge.engine.estimator import ZOConfig, perturbed_replicas  # noqa: E402
from fedprge.export.backend import PTEBackend  # noqa: E402
from fedprge.export.lower import ProgramSpec, export_pte, spec_path  # noqa: E402
from fedprge.export.program import NLLProgram, PRGEProgram  # noqa: E402
from fedprge.export.runtime import PTEProgram  # noqa: E402

Q, BS, T, EPS = 2, 2, 16, 1e-2
SEEDS = [7, 2**32 - 1]


@pytest.fixture(scope="module")
def eager() -> EagerBackend:
    from fedprge.engine.adapters import LoRAConfig, LoRAFA
    from fedprge.models import load_model

    model, _ = load_model("tiny")
    return EagerBackend(model, LoRAFA(model, LoRAConfig()))


# Exporting the tiny model takes ~7 s for portable and ~14-22 s for XNNPACK (17 delegate partitions) here.
# Both are in the slow tier (exports); the argument checks at the end need no program and stay fast.
@pytest.fixture(scope="module", params=[pytest.param(b, marks=pytest.mark.slow) for b in ("xnnpack", "portable")])
def program(request, tmp_path_factory) -> PTEProgram:
    out = tmp_path_factory.mktemp(request.param) / "tiny.pte"
    export_pte(out, "tiny", q=Q, eps=EPS, batch_size=BS, seq_len=T, backend=request.param)
    return PTEProgram(out, num_threads=1)


def make_batch(bs: int, t: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49152, (bs, t), generator=torch.Generator().manual_seed(0))
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[:, :3] = -100
    labels[-1, t - 3 :], mask[-1, t - 3 :] = -100, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_spec_sidecar(program):
    spec = ProgramSpec.load(spec_path(program.path))
    assert (spec.q, spec.batch_size, spec.seq_len, spec.eps) == (Q, BS, T, EPS)
    assert (program.q, program.batch_size, program.seq_len) == (Q, BS, T)
    assert spec.num_params == program.num_params and spec.target_modules == ("q_proj", "v_proj")


def test_directions_bit_identical(program):
    assert torch.equal(program.directions(SEEDS), rng.directions(SEEDS, program.num_params))


@pytest.mark.parametrize("shape", [(BS, T), (BS, T - 5), (1, T - 2)], ids=["exact", "short", "one-row"])
def test_losses_match_eager(program, eager, shape):
    batch = make_batch(*shape)
    b = 0.05 * rng.directions([99], eager.num_params)[0]
    with torch.no_grad():
        want = eager.losses(perturbed_replicas(b, rng.directions(SEEDS, eager.num_params), EPS), batch)
    got = program.losses(SEEDS, b, batch)
    assert got.shape == (2 * Q,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.equal(got[:Q], got[Q:])  # the +eps and -eps halves differ


def test_program_computes_the_eager_nll_before_export(eager):
    """The program's all-positions, masked NLL is the eager backend's labelled-positions one (same head_nll)."""
    batch, b = make_batch(BS, T), 0.05 * rng.directions([99], eager.num_params)[0]
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        got = PRGEProgram(eager.model, eager.lora, Q, EPS)(*inputs, torch.tensor(SEEDS), b)
        sums, counts = NLLProgram(eager.model, eager.lora)(*inputs, b)
    want = eager.perturbed_losses(b, batch, SEEDS, ZOConfig(q=Q, eps=EPS))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    want_sums, want_counts = eager.example_nll(b, batch)
    torch.testing.assert_close(sums, want_sums, rtol=1e-6, atol=0)  # sums of ~13 token NLLs: a few fp32 ulps
    assert torch.equal(counts, want_counts)


def test_backend_refuses_a_step_with_another_eps(program):
    backend, batch = PTEBackend(program), make_batch(BS, T)
    b = torch.zeros(program.num_params)
    torch.testing.assert_close(
        backend.perturbed_losses(b, batch, SEEDS, ZOConfig(q=Q, eps=EPS)),
        program.losses(SEEDS, b, batch),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match=r"exported for eps=0.01.*eps=0.02"):
        backend.perturbed_losses(b, batch, SEEDS, ZOConfig(q=Q, eps=2 * EPS))


def test_too_long_batch_is_rejected(program):
    with pytest.raises(ValueError, match=rf"\({BS}, {T + 1}\).*\({BS}, {T}\)"):
        program.losses(SEEDS, torch.zeros(program.num_params), make_batch(BS, T + 1))
    with pytest.raises(ValueError, match=rf"\({BS + 1}, {T}\)"):
        program.losses(SEEDS, torch.zeros(program.num_params), make_batch(BS + 1, T))


def test_wrong_seeds_and_b_are_rejected(program):
    with pytest.raises(ValueError, match=f"q={Q}"):
        program.directions([1, 2, 3])
    with pytest.raises(ValueError, match="2\\*\\*32"):
        program.directions([1, 2**32])
    with pytest.raises(ValueError, match=f"\\({program.num_params},\\)"):
        program.losses(SEEDS, torch.zeros(3), make_batch(BS, T))


def test_bad_export_arguments_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="backend='coreml'.*xnnpack"):
        export_pte(tmp_path / "x.pte", backend="coreml")
    with pytest.raises(ValueError, match="seq_len=1"):
        export_pte(tmp_path / "x.pte", seq_len=1)
