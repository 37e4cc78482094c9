"""The power-law spectrum of the Gaussian start: grid frequencies of a cosine basis against their
closed form, and the marginal-likelihood fit recovering a known spectrum."""

from __future__ import annotations

import math

import torch

from diffem_cli.gaussian.spectrum import fit_power_spectrum, grid_frequencies


def dct_basis(n: int) -> torch.Tensor:
    """Orthonormal DCT-II basis vectors of length ``n`` as columns."""
    i = torch.arange(n, dtype=torch.float64)
    basis = torch.cos(math.pi * (i[:, None] + 0.5) * i[None, :] / n) * math.sqrt(2 / n)
    basis[:, 0] /= math.sqrt(2)
    return basis


def test_grid_frequencies_of_the_cosine_basis_are_the_neumann_laplacian_eigenvalues():
    h, w = 5, 7
    basis = torch.kron(dct_basis(h), dct_basis(w))  # column (p, q) = cos_p (x) cos_q
    freq = grid_frequencies(basis, (1, h, w))
    p = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    q = torch.arange(w, dtype=torch.float64).repeat(h)
    expected = 4 * torch.sin(math.pi * p / (2 * h)) ** 2 + 4 * torch.sin(math.pi * q / (2 * w)) ** 2
    torch.testing.assert_close(freq, expected, rtol=0, atol=1e-12)


def test_power_spectrum_fit_recovers_a_known_spectrum_from_its_expected_energies():
    """With the exact expected energies the likelihood is maximal at the true parameters, so the
    fit returns the true variances (to the optimiser's tolerance), barely observed ones included."""
    colours, k = 3, 64
    freq = torch.linspace(0.0, 8.0, k, dtype=torch.float64).repeat(colours)
    amp = torch.tensor([0.5, 0.2, 0.9], dtype=torch.float64).repeat_interleave(k)
    truth = amp * (freq + 0.3) ** -1.4
    gain = torch.exp(-0.4 * freq)  # a blur: high frequencies pass at gain e^-3.2
    noise_var = 1e-4
    energy = gain**2 * truth + noise_var
    fitted = fit_power_spectrum(energy, gain, freq, noise_var, colours)
    # L-BFGS stops once the loss changes by less than its tolerance_change (1e-9); the loss is
    # quadratic near the optimum with curvature of order 1, so the parameters, and the log of
    # every variance, are off by about sqrt(1e-9) = 3e-5 (float64 rounding is far below): 1e-3
    # leaves a wide margin on any CPU and thread count.
    torch.testing.assert_close(fitted, truth, rtol=1e-3, atol=0)
