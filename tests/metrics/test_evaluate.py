"""evaluate_tensors / evaluate_folders and the ``diffem evaluate`` command on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.sources import sample_manifold
from diffem_cli.io.store import write_dataset
from diffem_cli.metrics.evaluate import METRICS, evaluate_folders, evaluate_tensors
from diffem_cli.metrics.images import psnr_per_image


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth random 1x8x8 images in [-1, 1] (blurred noise), enough structure for the metrics."""
    x = torch.randn(n, 1, 8, 8, generator=_gen(seed))
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return (x / x.abs().amax()).clamp(-1, 1)


def test_vector_defaults() -> None:
    ref = sample_manifold(600, draw_seed=1)
    out = evaluate_tensors(sample_manifold(300, draw_seed=2), ref, n_points=128)
    assert list(out) == ["sinkhorn", "sliced_w2"]
    worse = evaluate_tensors(sample_manifold(300, draw_seed=2) + 0.3, ref, n_points=128)
    assert worse["sinkhorn"] > out["sinkhorn"] and worse["sliced_w2"] > out["sliced_w2"]


def test_image_defaults_pair_only_with_both_index_columns() -> None:
    ref = _images(64, 0)
    x = (ref + 0.1 * torch.randn(ref.shape, generator=_gen(1))).clamp(-1, 1)
    unpaired = evaluate_tensors(x, ref)
    assert list(unpaired) == ["fd_rand", "fd_pixels"]
    idx = torch.arange(64)
    paired = evaluate_tensors(x, ref, sample_index=idx, reference_index=idx)
    assert list(paired) == ["psnr", "ssim", "fd_rand", "fd_pixels"]
    assert paired["fd_rand"] == unpaired["fd_rand"]
    assert 15 < paired["psnr"] < 40 and 0 < paired["ssim"] < 1


def test_pairing_follows_the_index_not_the_row_order() -> None:
    ref = _images(32, 2)
    perm = torch.randperm(32, generator=_gen(3))
    out = evaluate_tensors(
        ref[perm], ref, ["psnr", "ssim"], sample_index=perm, reference_index=torch.arange(32)
    )
    assert out["psnr"] == pytest.approx(100.0) and out["ssim"] == pytest.approx(1.0, abs=1e-6)
    shuffled = evaluate_tensors(
        ref[perm], ref, ["psnr"], sample_index=torch.arange(32), reference_index=torch.arange(32)
    )
    assert shuffled["psnr"] < 40


def test_several_samples_per_observation_are_averaged_per_observation() -> None:
    ref = _images(3, 4)
    index = torch.tensor([0, 0, 0, 1, 2])  # observation 0 has three samples, the others one
    x = (ref[index] + torch.tensor([0.02, 0.1, 0.3, 0.05, 0.2])[:, None, None, None]).clamp(-1, 1)
    per_pair = psnr_per_image(x, ref[index])
    expected = float((per_pair[:3].mean() + per_pair[3] + per_pair[4]) / 3)
    out = evaluate_tensors(x, ref, ["psnr"], sample_index=index, reference_index=torch.arange(3))
    assert out["psnr"] == pytest.approx(expected, rel=1e-12)
    assert out["psnr"] != pytest.approx(float(per_pair.mean()), rel=1e-3)


def test_bad_requests_raise_one_line_errors() -> None:
    vec = sample_manifold(50, draw_seed=5)
    img = _images(8, 5)
    with pytest.raises(DiffemError, match="unknown metric 'fidd'.*available: sinkhorn") as err:
        evaluate_tensors(vec, vec, ["fidd"])
    assert "\n" not in str(err.value)
    with pytest.raises(DiffemError, match="shape"):
        evaluate_tensors(vec, vec[:, :3])
    with pytest.raises(DiffemError, match="needs images"):
        evaluate_tensors(vec, vec, ["psnr"])
    with pytest.raises(DiffemError, match="'index' column"):
        evaluate_tensors(img, img, ["ssim"])
    with pytest.raises(DiffemError, match="no reference row"):
        evaluate_tensors(
            img, img, ["psnr"], sample_index=torch.arange(8) + 1, reference_index=torch.arange(8)
        )
    with pytest.raises(DiffemError, match="more than once"):
        evaluate_tensors(img, img, ["psnr"], sample_index=torch.arange(8), reference_index=torch.zeros(8))
    with pytest.raises(DiffemError, match="rows must be"):
        evaluate_tensors(torch.zeros(4, 2, 3), torch.zeros(4, 2, 3))


def test_metric_names_listed_in_the_cli_help() -> None:
    import inspect

    from diffem_cli.cli.commands import evaluate_cmd

    source = inspect.getsource(evaluate_cmd)
    assert all(name in source for name in METRICS)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    clean = sample_manifold(400, draw_seed=6)
    samples = sample_manifold(200, draw_seed=7) + 0.05
    ref_img = _images(40, 8)
    rec = (ref_img[torch.arange(40).repeat(2)] + 0.05 * torch.randn(80, 1, 8, 8, generator=_gen(9))).clamp(
        -1, 1
    )
    paths = {k: tmp_path / k for k in ("clean", "samples", "clean_img", "recon")}
    write_dataset(paths["clean"], [{"x": clean, "index": torch.arange(400)}], {"kind": "clean"})
    write_dataset(paths["samples"], [{"x": samples[:100]}, {"x": samples[100:]}], {"kind": "samples"})
    write_dataset(
        paths["clean_img"],
        [{"x": ref_img, "index": torch.arange(40)}],
        {"kind": "clean", "value_range": [-1.0, 1.0]},
    )
    write_dataset(
        paths["recon"], [{"x": rec, "index": torch.arange(40).repeat(2)}], {"kind": "reconstructions"}
    )
    return paths


def test_evaluate_folders_equals_evaluate_tensors(folders: dict[str, Path]) -> None:
    vec = evaluate_folders(folders["samples"], folders["clean"], n_points=64)
    expected = evaluate_tensors(
        sample_manifold(200, draw_seed=7) + 0.05, sample_manifold(400, draw_seed=6), n_points=64
    )
    # Vectors: both sides are the same float32 points through the same code; only float64
    # reductions could be ordered differently (relative error ~ n * 2^-53 ~ 1e-13).
    assert vec == pytest.approx(expected, rel=1e-9)
    img = evaluate_folders(folders["recon"], folders["clean_img"], chunk_size=16)  # chunks cut through pairs
    assert list(img) == ["psnr", "ssim", "fd_rand", "fd_pixels"]
    from diffem_cli.io.store import columns, read_dataset
    from diffem_cli.metrics.features import random_features
    from diffem_cli.metrics.frechet import moments

    ds, _ = read_dataset(folders["recon"])
    cols = columns(ds, ["x", "index"])
    ref = columns(read_dataset(folders["clean_img"])[0], ["x"])["x"]
    direct = evaluate_tensors(
        cols["x"], ref, None, sample_index=cols["index"], reference_index=torch.arange(40)
    )
    # psnr, ssim: float64 per image (64 pixels, SSIM windows of at most 7 x 7 and its E[x^2] - mu^2
    # cancellation bounded by range^2 / C2 ~ 1e3): relative error <= 64 * 1e3 * 2^-53 ~ 1e-11.
    # fd_pixels: float32 pixels are exact in float64; the chunked float64 moments differ by ~1e-15.
    for name in ("psnr", "ssim", "fd_pixels"):
        assert img[name] == pytest.approx(direct[name], rel=1e-9), name
    # fd_rand: the random-CNN features are float32 sums of up to K = 64 * 9 + 64 terms (the last
    # 3x3 convolution over 64 channels, then the spatial mean) whose rounding depends on the batch
    # (16 rows here, all 80 there) and on the CPU's kernels: relative error up to g = K * 2^-24.
    # sqrt(FD) is the Wasserstein-2 distance of two Gaussians, and moving every feature vector by
    # at most g times its size moves each Gaussian by at most g * sqrt(S), S = |mu|^2 + Tr(Sigma)
    # of its features; so |dFD| <= 2 sqrt(FD) g (sqrt(S_a) + sqrt(S_b)) + (g (sqrt(S_a) + sqrt(S_b)))^2.
    g = (64 * 9 + 64) * 2.0**-24
    spread = 0.0
    for feats in (random_features(cols["x"]), random_features(ref)):
        mu, cov = moments(feats)
        spread += float(mu.pow(2).sum() + cov.trace()) ** 0.5
    fd = direct["fd_rand"]
    bound = 2 * fd**0.5 * g * spread + (g * spread) ** 2
    assert abs(img["fd_rand"] - fd) <= bound
    # ... and the bound is tight enough to catch a chunking mistake such as a dropped chunk
    dropped = evaluate_tensors(cols["x"][:64], ref, ["fd_rand"])["fd_rand"]
    assert abs(dropped - fd) > 10 * bound


def test_cli_end_to_end_with_json(cli, folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    code, stdout, stderr = cli(
        "evaluate", folders["recon"], "--reference", folders["clean_img"], "--json", out
    )
    assert code == 0, stderr
    assert "psnr" in stdout and "fd_rand" in stdout
    record = json.loads(out.read_text())
    assert set(record["metrics"]) == {"psnr", "ssim", "fd_rand", "fd_pixels"}
    assert record["reference"] == str(folders["clean_img"])
    code, _, stderr = cli("evaluate", folders["recon"], "--reference", folders["clean_img"], "--json", out)
    assert code == 2 and "already exists" in stderr and stderr.count("\n") == 1
    code, _, stderr = cli(
        "evaluate",
        folders["samples"],
        "--reference",
        folders["clean"],
        "--json",
        out,
        "--metrics",
        "sliced_w2,sinkhorn",
        "--n-points",
        "64",
        "--force",
    )
    assert code == 0, stderr
    assert list(json.loads(out.read_text())["metrics"]) == ["sliced_w2", "sinkhorn"]


def test_cli_bad_inputs(cli, folders: dict[str, Path], tmp_path: Path) -> None:
    code, _, stderr = cli("evaluate", tmp_path / "missing", "--reference", folders["clean"])
    assert code == 2 and "does not exist" in stderr and stderr.count("\n") == 1
    code, _, stderr = cli(
        "evaluate", folders["samples"], "--reference", folders["clean"], "--metrics", "nope"
    )
    assert code == 2 and "unknown metric 'nope'" in stderr
    code, _, stderr = cli("evaluate", folders["samples"], "--reference", folders["clean_img"])
    assert code == 2 and "shape" in stderr
    code, _, stderr = cli(
        "evaluate",
        folders["samples"],
        "--reference",
        folders["clean"],
        "--json",
        tmp_path / "no" / "such" / "dir.json",
    )
    assert code == 2 and "does not exist" in stderr


@pytest.fixture
def drawn(tmp_path: Path) -> dict[str, Path]:
    """Masked digits and a folder of 3 draws per observation (shuffled rows): the observed pixels
    exact, noise on the missing ones."""
    from diffem_cli.io import registry
    from diffem_cli.io.sources import load_source
    from diffem_cli.pipeline.corrupt import corrupt_dataset

    paths = {k: tmp_path / k for k in ("obs", "clean", "draws", "uneven", "one")}
    channel = registry.make_channel("mask", {"rho": "0.5"})
    corrupt_dataset(
        load_source("digits", skip=20, limit=12),
        channel,
        paths["obs"],
        clean_out=paths["clean"],
        progress=False,
    )
    from diffem_cli.io.observations import Observations

    seen = Observations(paths["obs"])
    x = load_source("digits", skip=20, limit=12).read(0, 12)
    keep = seen.obs["mask"].expand_as(x)
    k = 3
    noise = 0.3 * torch.randn(k, *x.shape, generator=_gen(4))
    draws = torch.where(keep.bool(), x, (x + noise).clamp(-1, 1))
    perm = torch.randperm(k * 12, generator=_gen(5))
    index, sample = seen.index.repeat(k), torch.arange(k).repeat_interleave(12)
    rows = {"x": draws.reshape(k * 12, *x.shape[1:]), "index": index, "sample": sample}
    write_dataset(paths["draws"], [{n: v[perm] for n, v in rows.items()}], {"kind": "reconstructions"})
    write_dataset(paths["uneven"], [{n: v[1:] for n, v in rows.items()}], {"kind": "reconstructions"})
    write_dataset(paths["one"], [{n: v[:12] for n, v in rows.items()}], {"kind": "reconstructions"})
    paths["want"] = draws  # type: ignore[assignment]
    return paths


def test_posterior_folder_is_posterior_quality_of_its_draws(drawn) -> None:
    from diffem_cli.io.observations import Observations, load_clean
    from diffem_cli.metrics.evaluate import posterior_folder
    from diffem_cli.metrics.posterior_quality import posterior_quality

    seen = Observations(drawn["obs"])
    x = load_clean(drawn["clean"], seen)
    want = posterior_quality(
        drawn["want"],
        x,
        exact=seen.channel.exact_entries(seen.obs),
        channel=seen.channel,
        obs=seen.obs,
        value_range=(-1.0, 1.0),
    )
    got = posterior_folder(
        drawn["draws"], drawn["clean"], channel=seen.channel, obs=seen.obs, obs_index=seen.index
    )
    assert got == {f"post_{k}": v for k, v in want.items()}  # the same tensors in the same order
    assert got["post_coverage"] < 1 and got["post_observed_residual"] == 0
    bare = posterior_folder(drawn["draws"], drawn["clean"])
    assert "post_coverage" not in bare and bare["post_psnr_mean"] == got["post_psnr_mean"]
    assert posterior_folder(drawn["one"], drawn["clean"]) is None
    with pytest.raises(DiffemError, match="same observations in each of their 3 draws"):
        posterior_folder(drawn["uneven"], drawn["clean"])


def test_cli_scores_draws_as_a_posterior(cli, drawn, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    code, stdout, stderr = cli(
        "evaluate",
        drawn["draws"],
        "--reference",
        drawn["clean"],
        "--observations",
        drawn["obs"],
        "--json",
        out,
    )
    assert code == 0, stderr
    record = json.loads(out.read_text())
    assert record["posterior"]["post_k"] == 3 and "post_coverage" in record["posterior"]
    assert "post_psnr_mean" in stdout
    code, _, stderr = cli(
        "evaluate", drawn["draws"], "--reference", drawn["clean"], "--observations", tmp_path / "no"
    )
    assert code == 2 and "observations folder" in stderr and stderr.count("\n") == 1


def test_evaluate_folders_passes_the_given_weights_to_each_network(monkeypatch, tmp_path) -> None:
    from diffem_cli.metrics import online

    monkeypatch.delenv(online.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(online.DINOV2_ENV, raising=False)
    write_dataset(tmp_path / "a", [{"x": torch.rand(4, 3, 8, 8) * 2 - 1}], {"kind": "samples"})
    given = {"inception": tmp_path / "inception.pth", "dinov2": tmp_path / "dino"}
    for metric, name in (("fid", "inception.pth"), ("is", "inception.pth"), ("fd_dinov2", "dino")):
        with pytest.raises(DiffemError, match=f"metric '{metric}': weights .*{name} does not exist"):
            evaluate_folders(tmp_path / "a", tmp_path / "a", [metric], weights=given)
