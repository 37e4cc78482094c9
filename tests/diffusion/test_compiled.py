"""torch.compile for the loops: when it is used, that it agrees with eager, and its fallback."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion import compiled as compiled_mod
from diffem_cli.diffusion.compiled import CompiledNetwork, compile_wanted, maybe_compile
from diffem_cli.diffusion.nets import VectorMLP
from diffem_cli.diffusion.sampling import SampleConfig, validate_sample
from diffem_cli.diffusion.train import TrainConfig, validate_train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_modes_choose_by_device():
    assert compile_wanted("on", CPU) and compile_wanted("on", CUDA)
    assert not compile_wanted("off", CPU) and not compile_wanted("off", CUDA)
    assert compile_wanted("auto", CUDA) and not compile_wanted("auto", CPU)
    # auto on CUDA: convolutional networks (a UNet inside any wrapper), not the MLP
    conv = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)))
    mlp = VectorMLP(3, 2, width=8, depth=1, emb_dim=4)
    assert compile_wanted("auto", CUDA, conv) and not compile_wanted("auto", CPU, conv)
    assert not compile_wanted("auto", CUDA, mlp) and compile_wanted("on", CUDA, mlp)
    net = torch.nn.Linear(2, 2)
    assert maybe_compile(net, "off", CPU) is net
    assert isinstance(maybe_compile(net, "on", CPU), CompiledNetwork)


def test_unknown_mode_is_refused():
    with pytest.raises(DiffemError, match="train.compile"):
        validate_train(TrainConfig(compile="yes"))
    with pytest.raises(DiffemError, match="sample.compile"):
        validate_sample(SampleConfig(compile="always"))


def test_wrapper_keeps_the_networks_parameters_and_state_keys():
    net = VectorMLP(3, 2, width=8, depth=1, emb_dim=4)
    wrapped = CompiledNetwork(net)
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in net.parameters()]
    assert list(wrapped.state_dict()) == [f"net.{k}" for k in net.state_dict()]


def _inputs(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 3, generator=gen)
    t = torch.randint(0, 1000, (16,), generator=gen)
    cond = torch.randn(16, 2, generator=gen)
    return x, t, cond


NO_CXX = shutil.which("c++") is None and shutil.which("g++") is None


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(CPU, marks=pytest.mark.skipif(NO_CXX, reason="no C++ compiler")),
        pytest.param(CUDA, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
    ids=["cpu", "cuda"],
)
def test_compiled_matches_eager_forward_and_gradients(device):
    torch.manual_seed(0)
    net = VectorMLP(3, 2, width=32, depth=2, emb_dim=8).to(device)
    x, t, cond = (v.to(device) for v in _inputs(torch.Generator().manual_seed(1)))
    ref = net.double()
    out64 = ref(x.double(), t, cond.double())
    out64.square().sum().backward()
    grads64 = [p.grad.clone() for p in ref.parameters()]
    out64 = out64.detach()
    net = net.float()
    net.zero_grad(set_to_none=True)
    wrapped = CompiledNetwork(net)
    results = {}
    for name, module in (("eager", net), ("compiled", wrapped)):
        net.zero_grad(set_to_none=True)
        out = module(x, t, cond)
        out.square().sum().backward()
        results[name] = (out.detach().double(), [p.grad.double() for p in net.parameters()])
    assert wrapped.compiled
    # Both float32 evaluations are compared with the float64 one (on CUDA too: matrix products there run
    # in full float32 unless TF32 is allowed, which torch leaves off by default). A dot product of K
    # terms in float32 errs by at most K*u times the sum of the terms' magnitudes (u = 2^-24); fused
    # kernels only reorder those sums (and LayerNorm's mean and variance over the width). With K <= 45
    # (the widest input, 3 + 8 + 2 = 13, or the width 32 plus the bias) per layer, 3 layers forward and
    # as many backward, and magnitudes bounded by 10x the largest output or gradient (the inputs are
    # unit normal, LayerNorm rescales to unit variance), 6 * 45 * u * 10 < 2e-4 relative to that scale.
    u = 2.0**-24
    bound = 6 * 45 * u * 10
    for name, (out, grads) in results.items():
        scale = float(out64.abs().max())
        assert float((out - out64).abs().max()) <= bound * scale, name
        for g, g64 in zip(grads, grads64, strict=True):
            assert float((g - g64).abs().max()) <= bound * max(float(g64.abs().max()), 1e-12), name


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    calls = []

    def broken_compile(net):
        def run(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("InductorError: no working C++ compiler found\nlong traceback")

        return run

    monkeypatch.setattr(compiled_mod.torch, "compile", broken_compile)
    net = VectorMLP(3, 2, width=8, depth=1, emb_dim=4)
    wrapped = CompiledNetwork(net)
    x, t, cond = _inputs(torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING):
        first = wrapped(x, t, cond)
        second = wrapped(x, t, cond)
    assert torch.equal(first, net(x, t, cond)) and torch.equal(second, first)
    assert len(calls) == 1 and not wrapped.compiled
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
