"""A fixed 2-D wavelet scattering transform (Morlet wavelets, FFT-based), after Kymatio's Scattering2D.

Tramèr & Boneh (ICLR 2021, "Differentially Private Learning Needs Better Features") train DP
models on ScatterNet features: with J = 2 scales, L = 8 angles and order 2 every input channel gives

    1 (order 0) + J L = 16 (order 1) + L^2 J (J - 1) / 2 = 64 (order 2) = 81 channels

at H / 2^J x W / 2^J. The transform has no trainable parameter: its filters are buffers, fixed by
(J, L, image size) alone, so it is data-independent and costs no privacy, and a DP engine (which
wants every parameter trainable) sees only the layers after it.

The computation follows Kymatio 0.3 (same filters, reflection padding, Fourier-domain
subsampling and output order): each image is reflection-padded with 2^J pixels on each side,
transformed, and after each convolution subsampled in the Fourier domain (periodisation), then
one pixel of padding is cut on each side of the output. Outputs agree with Kymatio's to 3e-5
relative (Kymatio normalises its Gaussians with 3.1415 for pi); Kymatio itself is not a dependency
(0.3.0's ``kymatio.torch`` no longer imports with SciPy >= 1.17, and its transform fails under
``torch.func.vmap``, which the fast engine uses).
Apart from a loop over the J scales everything is batched tensor algebra (no loop over angles or
examples), so it runs under ``torch.func.vmap``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SIGMA0 = 0.8  # Gaussian width of the finest wavelet, in pixels (Kymatio's value)
XI0 = 3.0 * math.pi / 4.0  # centre frequency of the finest wavelet


def scattering_channels(J: int = 2, L: int = 8) -> int:
    """Output channels per input channel of an order-2 transform (81 for J=2, L=8)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def padded_size(n: int, J: int) -> int:
    """Kymatio's padded support: the next multiple of 2^J above n + 2^J."""
    return ((n + 2 ** J) // 2 ** J + 1) * 2 ** J


def gabor_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
    """Complex Gabor filter [m, n] in space, periodised over 5x5 copies of the grid (as Kymatio)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    curv = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2 * sigma * sigma)  # [2, 2]
    gab = np.zeros((m, n), np.complex128)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            xx, yy = np.mgrid[ex * m:(ex + 1) * m, ey * n:(ey + 1) * n].astype(np.float64)
            arg = -(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy)
            gab += np.exp(arg + 1j * xi * (xx * c + yy * s))
    return gab / (2 * math.pi * sigma * sigma / slant)


def morlet_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """Gabor minus its envelope times the constant that makes the sum exactly zero (a wavelet)."""
    wave = gabor_2d(m, n, sigma, theta, xi, slant)
    envelope = gabor_2d(m, n, sigma, theta, 0.0, slant)
    return wave - wave.sum() / envelope.sum() * envelope


def periodize_fourier(f: np.ndarray, res: int) -> np.ndarray:
    """A Fourier filter [m, n] for signals subsampled by 2^res: [m / 2^res, n / 2^res].

    The band of frequencies above the new Nyquist limit is cut, then the spectrum is folded
    (summed over the 2^res x 2^res copies), as Kymatio's ``periodize_filter_fft``.
    """
    if res == 0:
        return f.copy()
    k, (m, n) = 2 ** res, f.shape
    f = f.copy()
    start_m, len_m = int(m * 2 ** (-res - 1)), int(m * (1 - 2 ** -res))
    start_n, len_n = int(n * 2 ** (-res - 1)), int(n * (1 - 2 ** -res))
    f[start_m:start_m + len_m, :] = 0
    f[:, start_n:start_n + len_n] = 0
    return f.reshape(k, m // k, k, n // k).sum(axis=(0, 2))


def subsample_fourier(x: torch.Tensor, k: int) -> torch.Tensor:
    """Spectrum [..., M, N] of a signal -> spectrum [..., M/k, N/k] of the signal subsampled by k."""
    if k == 1:
        return x
    m, n = x.shape[-2:]
    return x.reshape(*x.shape[:-2], k, m // k, k, n // k).mean(dim=(-4, -2))


class Scattering2D(nn.Module):
    """Order-2 scattering of [B, C, H, W] images into [B, C * K, H / 2^J, W / 2^J], K = 81 for J=2, L=8.

    Channel order per input channel, as Kymatio: order 0, then order 1 by (j, angle), then order 2
    by (j1, angle1, j2, angle2) with j1 < j2. Filters are float32 buffers (no parameters).

    Example:
        >>> Scattering2D(28)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 81, 7, 7])
    """

    def __init__(self, image_size: int, J: int = 2, L: int = 8) -> None:
        super().__init__()
        if J < 1 or L < 1:
            raise ValueError(f"scattering needs J >= 1 and L >= 1, got J={J}, L={L}")
        if image_size % 2 ** J or image_size <= 2 ** J:
            raise ValueError(f"scattering with J={J} needs an image size that is a multiple of {2 ** J} "
                             f"above {2 ** J}, got {image_size}")
        self.image_size, self.J, self.L = image_size, J, L
        self.padded = padded_size(image_size, J)
        self.pad = (self.padded - image_size) // 2  # 2^J on each side
        m = self.padded
        # Low-pass phi at every resolution 2^-r, r < J: buffers phi_r [m / 2^r, m / 2^r].
        phi = np.real(np.fft.fft2(gabor_2d(m, m, SIGMA0 * 2 ** (J - 1), 0.0, 0.0)))
        for r in range(J):
            self.register_buffer(f"phi_{r}", torch.tensor(periodize_fourier(phi, r), dtype=torch.float32))
        # Wavelets psi_{j, angle}: buffers psi_j_r [L, m / 2^r, m / 2^r] at the resolutions used: r = 0
        # (order 1) and every r < j (order 2 after a coarser first wavelet).
        for j in range(J):
            psi = np.stack([np.real(np.fft.fft2(morlet_2d(
                m, m, SIGMA0 * 2 ** j, (int(L - L / 2 - 1) - t) * math.pi / L, XI0 / 2 ** j, 4.0 / L)))
                for t in range(L)])  # [L, m, m]
            for r in range(max(j, 1)):
                self.register_buffer(f"psi_{j}_{r}", torch.tensor(
                    np.stack([periodize_fourier(p, r) for p in psi]), dtype=torch.float32))

    def _low_pass(self, u_hat: torch.Tensor, j: int) -> torch.Tensor:
        """Spectrum at resolution 2^-j [..., m/2^j, m/2^j] -> real coefficients [..., H/2^J, W/2^J]."""
        s_hat = subsample_fourier(u_hat * getattr(self, f"phi_{j}"), 2 ** (self.J - j))
        s = torch.fft.ifft2(s_hat).real
        return s[..., 1:-1, 1:-1]  # cut the padding (one pixel at the coarsest resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"Scattering2D was built for {self.image_size}x{self.image_size} images, "
                             f"got {h}x{w}")
        p = self.pad
        x = x.reshape(b * c, 1, h, w).to(self.phi_0.dtype)  # the filters' precision (FFTs have no bf16)
        u = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")  # [BC, 1, m, m]
        u0_hat = torch.fft.fft2(u[:, 0])  # [BC, m, m] complex
        out = [self._low_pass(u0_hat, 0).unsqueeze(1)]  # order 0: [BC, 1, h', w']
        order2 = []
        for j1 in range(self.J):
            # |x * psi_{j1}| for the L angles, at resolution 2^-j1: [BC, L, m/2^j1, m/2^j1]
            u1 = subsample_fourier(u0_hat.unsqueeze(1) * getattr(self, f"psi_{j1}_0"), 2 ** j1)
            u1_hat = torch.fft.fft2(torch.fft.ifft2(u1).abs())
            out.append(self._low_pass(u1_hat, j1))  # order 1: [BC, L, h', w']
            by_j2 = []
            for j2 in range(j1 + 1, self.J):
                # ||x * psi_{j1}| * psi_{j2}| for L x L angle pairs: [BC, L, L, m/2^j2, m/2^j2]
                u2 = subsample_fourier(u1_hat.unsqueeze(2) * getattr(self, f"psi_{j2}_{j1}"), 2 ** (j2 - j1))
                u2_hat = torch.fft.fft2(torch.fft.ifft2(u2).abs())
                by_j2.append(self._low_pass(u2_hat, j2))  # [BC, L, L, h', w']
            if by_j2:  # Kymatio's order: angle1, then j2, then angle2
                order2.append(torch.cat(by_j2, dim=2).flatten(1, 2))  # [BC, L * L * (J - 1 - j1), h', w']
        s = torch.cat(out + order2, dim=1)  # [BC, K, h', w']
        return s.reshape(b, c * s.shape[1], *s.shape[-2:])  # [B, C*K, H/2^J, W/2^J]
