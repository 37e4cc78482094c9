"""Compute accounting: network forwards and vector-Jacobian products counted on the network,
checked against what each method's sampler must take."""

from __future__ import annotations

import pytest
import torch
from helpers import run_ok

from diffem_cli.diffusion.nets import build_network
from diffem_cli.diffusion.sampling import SampleConfig, sample_nfe
from diffem_cli.io.observations import Observations
from diffem_cli.methods import default_config, get_method
from diffem_cli.pipeline.accounting import CountingNetwork
from diffem_cli.pipeline.em import posterior_samples

NETWORK = {"type": "mlp", "width": 16, "depth": 1, "emb_dim": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Observations:
    root = tmp_path_factory.mktemp("acc")
    run_ok("corrupt", "manifold:samples=12", root / "obs", "-c", "projection")
    return Observations(root / "obs")


def test_counting_network_counts_rows_of_forwards_and_vjps():
    net = CountingNetwork(torch.nn.Linear(3, 3))
    x = torch.randn(5, 3, requires_grad=True)
    out = net(x)
    for _ in range(2):
        torch.autograd.grad(out, x, torch.ones_like(out), retain_graph=True)
    with torch.no_grad():
        net(torch.randn(4, 3))
    assert (net.forwards, net.vjps) == (9, 10)
    assert net.totals() == {"forwards": 9, "vjps": 10}


@pytest.mark.parametrize(
    ("method", "options", "vjps_per_forward", "trial_rows"),
    [
        ("diffem", {}, 0, 0),
        ("dps-em", {"adaptive": False}, 1, 0),  # one VJP of the residual per network evaluation
        ("dps-em", {"adaptive": True, "grid": [1.0, 2.0], "subset": 5}, 1, 2 * 5),  # trial draws
        ("em-mmps", {"covariance": "tweedie", "cg_iters": 2}, 3, 0),  # CG's two, then the final one
        ("em-mmps", {"covariance": "gaussian", "cg_iters": 2}, 1, 0),  # CG on the Gaussian: the final one
    ],
)
def test_estep_counts_match_each_method_sampler(data, method, options, vjps_per_forward, trial_rows):
    cfg = default_config()
    section = {"dps-em": "dps", "em-mmps": "mmps"}.get(method)
    for key, value in options.items():
        setattr(cfg.options[section], key, value)
    m = get_method(method, cfg)
    torch.manual_seed(0)
    spec = m.model_spec(data)
    net = build_network(NETWORK, data.shape, spec.cond_size)
    aux = {}
    if method == "em-mmps" and options["covariance"] == "gaussian":
        aux = m.mstep(data, torch.randn(len(data), *data.shape), 1, 1, None, cfg).aux
    sample = SampleConfig(steps=3, corrections=1, keep_observed=False)
    _, record = posterior_samples(
        m, net, aux, data, sample, seed_parts=(0, 1), device=torch.device("cpu"), label="test"
    )
    forwards = (len(data) + trial_rows) * sample_nfe(3, 1)
    assert record["estep_forwards"] == forwards
    assert record["estep_vjps"] == vjps_per_forward * forwards
