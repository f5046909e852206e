import pytest
import torch
from conftest import small_llama
from torch import nn

from fedprge.config import load_config
from fedprge.engine import rng
from fedprge.engine.adapters import LoRAConfig, LoRAFA
from fedprge.engine.backend import EagerBackend
from fedprge.engine.estimator import ZOConfig, prge_step, sequential_step
from fedprge.engine.shared_base import SharedBase, SharedBaseLinear


def test_replica_differences_keep_their_precision():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    base = torch.randn(1, 32, 256)
    x = torch.cat([base, base + 1e-3 * torch.randn(3, 32, 256)])  # replicas a small step apart
    exact = ((x[1:] - x[:1]).double() @ lin.weight.double().t()).float()  # the differences g is made of
    shared = SharedBaseLinear(lin)
    shared.dup = 4
    with torch.no_grad():
        y = shared(x)
        plain = nn.functional.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float()
    err_shared = ((y[1:] - y[:1]) - exact).norm() / exact.norm()
    err_plain = ((plain[1:] - plain[:1]) - exact).norm() / exact.norm()
    assert err_shared < 1e-2, err_shared
    assert err_plain > 10 * err_shared, (err_plain, err_shared)
    shared.dup = 1
    torch.testing.assert_close(shared(x), lin(x), rtol=0, atol=0)  # one replica: the plain fp32 layer


def backends(**kw):
    out = {}
    for precision in ("float32", "shared-bf16"):
        model = small_llama(hidden=128, layers=4, **kw)
        out[precision] = EagerBackend(model, LoRAFA(model, LoRAConfig(rank=4)), precision=precision)
    return out


def test_projected_gradients_stay_close_to_float32(batch):
    be = backends()
    b = 1e-2 * rng.directions([3], be["float32"].num_params)[0]
    cfg = ZOConfig(q=4, eps=1e-2, lr=1e-2)
    seeds = [rng.derive_seed(5, i) for i in range(cfg.q)]
    _, ref = sequential_step(lambda r: be["float32"].losses(r, batch), b, seeds, cfg)
    _, got = prge_step(lambda r: be["shared-bf16"].losses(r, batch), b, seeds, cfg)
    g_ref, g = torch.tensor(ref.projected_grads), torch.tensor(got.projected_grads)
    assert (g - g_ref).norm() / g_ref.norm() < 0.015, (g, g_ref)  # plain bf16 weights: 2.1%
    # a single-replica evaluation (validation, personalization) is the untouched fp32 model
    torch.testing.assert_close(
        be["shared-bf16"].example_nll(b, batch), be["float32"].example_nll(b, batch), rtol=0, atol=0
    )


def test_bad_precision_is_rejected():
    model = small_llama()
    with pytest.raises(ValueError, match="precision='bf16'.*float32"):
        EagerBackend(model, LoRAFA(model, LoRAConfig()), precision="bf16")
    with pytest.raises(ValueError, match="float32 model"):
        SharedBase(small_llama(dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="model.precision='half'"):
        load_config([], ["model.precision=half"])
    with pytest.raises(ValueError, match="model.precision='shared-bf16'.*model.dtype=float32"):
        load_config([], ["model.precision=shared-bf16", "model.dtype=bfloat16"])


def test_a_run_config_selects_it_and_local_training_stays_close_to_float32():
    from fedprge.task import Task

    over = ["zo.lr=0.05"]
    fp32 = Task(load_config(["configs/smoke.yaml"], over))
    bf16 = Task(load_config(["configs/smoke.yaml"], [*over, "model.precision=shared-bf16"]))
    assert bf16.backend.precision == "shared-bf16" and fp32.backend.precision == "float32"
    b = torch.zeros(fp32.num_params)
    ref, got = fp32.train(b, 0, 1), bf16.train(b, 0, 1)
    g_ref, g = torch.from_numpy(ref.projected_grads), torch.from_numpy(got.projected_grads)
    assert g.shape == g_ref.shape == (3, 4)
    assert (g - g_ref).norm() / g_ref.norm() < 0.05, (g, g_ref)


def test_auto_precision_follows_the_machines_bf16_units():
    from fedprge.engine.shared_base import resolve_precision

    flags = set(open("/proc/cpuinfo").read().split())  # noqa: SIM115 - a one-shot read
    bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto") == ("shared-bf16" if bf16 else "float32")  # the CPU's own units decide
    assert resolve_precision("auto", "cuda") == ("shared-bf16" if torch.cuda.is_available() else "float32")
    assert [resolve_precision(p) for p in ("float32", "shared-bf16")] == ["float32", "shared-bf16"]
    with pytest.raises(ValueError, match="precision='bf16'.*auto"):
        resolve_precision("bf16")
