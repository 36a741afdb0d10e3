"""Few-step samplers for diffusion decoders (eps-VAE, paper 004) and their starting noise.

One signature for every sampler::

    sample(model_fn, z, steps, *, shape=None, noise=None, seed=0, generator=None,
           schedule="reversed_log", deterministic_noise=False, noise_origin=(0, 0)) -> x0

``model_fn(x_t, t, z) -> v`` is a velocity predictor of the rectified flow x_t = (1-t) x_0 + t eps
(Eq. 5; t has shape (B,)); the sampler integrates the probability-flow ODE dx = v dt (Eq. 7) from
t = 1 (noise) to t = 0 with Euler steps and returns the state at t = 0. ``z`` is passed through
to ``model_fn`` untouched (a latent, or any precomputed conditioning).

Time grid (``schedule``): ``"reversed_log"`` maps the uniform grid u_i = i / N through Eq. 13,
    rho(u; m, n) = (log m - log(u (m - n) + n)) / (log m - log n),  m = 1, n = 100,
so rho(0) = 1 (noise) and rho(1) = 0 (data), decreasing, with small steps near the noise end
("denser sampling steps early in the inference process"); ``"uniform"`` is t_i = 1 - i / N. NFE = N
for any N >= 1; N = 1 is the single Euler step x0 = eps - v(eps, 1).

Noise: with ``deterministic_noise=False`` the noise is ``torch.randn`` from a CPU generator seeded
with ``seed`` (bit-identical on the same machine and thread count; depends on the batch shape).
With ``deterministic_noise=True`` each value is a hash of (seed, channel, absolute pixel row and
column) turned into a Gaussian (Box-Muller), independent of the batch index and of the tile: a tile
whose top-left pixel is ``noise_origin`` gets exactly the noise the full image has there.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from vaepack.errors import UsageError

SCHEDULES = ("reversed_log", "uniform")
LOG_M, LOG_N = 1.0, 100.0  # Eq. 13 constants m, n (paper: m = 1, n = 100)
_M32 = 0xFFFFFFFF
_HASH_K = 0x045D9F3B  # odd multiplier < 2^27: products of 32-bit values stay inside int64

ModelFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


# ----------------------------------------------------------------------------- time grids
def rho_log(u: float, m: float = LOG_M, n: float = LOG_N) -> float:
    """Eq. 13, the reversed logarithm mapping of u in [0, 1] to a time in [0, 1] (rho(0)=1, rho(1)=0)."""
    return (math.log(m) - math.log(u * (m - n) + n)) / (math.log(m) - math.log(n))


def time_grid(steps: int, schedule: str = "reversed_log") -> list[float]:
    """The N + 1 times t_0 = 1 > t_1 > ... > t_N = 0 visited by an N-step sampler."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UsageError(f"--steps must be an integer >= 1, got {steps!r}")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule '{schedule}' (choose {', '.join(SCHEDULES)})")
    u = [i / steps for i in range(steps + 1)]
    grid = [1.0 - x for x in u] if schedule == "uniform" else [rho_log(x) for x in u]
    grid[0], grid[-1] = 1.0, 0.0  # exact endpoints (rho_log(1) evaluates to -0.0)
    return grid


# ----------------------------------------------------------------------------- noise
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer avalanche (xorshift-multiply rounds) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * _HASH_K) & _M32
    x = x ^ (x >> 16)
    x = (x * _HASH_K) & _M32
    return x ^ (x >> 16)


def position_noise(shape: tuple[int, ...], seed: int = 0, origin: tuple[int, int] = (0, 0),
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) noise that is a pure function of (seed, channel, absolute y, absolute x).

    Every batch member gets the same noise; a crop at ``origin`` equals the same crop of the noise
    of the full image. Computed on the CPU in integer arithmetic + float64 Box-Muller.
    """
    b, c, h, w = shape
    y0, x0 = origin
    ch = torch.arange(c, dtype=torch.int64).view(c, 1, 1)
    ys = ((torch.arange(h, dtype=torch.int64) + int(y0)) & _M32).view(1, h, 1)
    xs = ((torch.arange(w, dtype=torch.int64) + int(x0)) & _M32).view(1, 1, w)
    s = torch.tensor(int(seed) & _M32, dtype=torch.int64)
    out = []
    for stream in (0x1B873593, 0x2C1B3C6D):  # two independent uniforms per value
        k = _mix32(_mix32(s ^ stream) ^ ch)
        k = _mix32(k ^ ys)
        k = _mix32(k ^ xs)
        out.append((k.double() + 0.5) / 4294967296.0)  # (0, 1), never 0 or 1
    u1, u2 = out
    n = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return n.to(dtype).unsqueeze(0).expand(b, c, h, w).contiguous().to(device)


def make_noise(shape: tuple[int, ...], *, seed: int = 0, generator: torch.Generator | None = None,
               deterministic: bool = False, origin: tuple[int, int] = (0, 0),
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Starting noise x_1 for a sampler; CPU-generated so CPU and CUDA runs start from the same noise."""
    if deterministic:
        return position_noise(tuple(shape), seed, origin, device)
    g = generator if generator is not None else torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device)


# ----------------------------------------------------------------------------- samplers
def sample(model_fn: ModelFn, z, steps: int, *, shape: tuple[int, ...] | None = None,
           noise: torch.Tensor | None = None, seed: int = 0, generator: torch.Generator | None = None,
           schedule: str = "reversed_log", deterministic_noise: bool = False,
           noise_origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Euler integration of dx = v dt (Eq. 7) on the grid of ``time_grid`` from t = 1 to t = 0."""
    grid = time_grid(steps, schedule)
    if noise is None:
        if shape is None:
            raise UsageError("sample() needs either the output shape or the starting noise")
        dev = z.device if isinstance(z, torch.Tensor) else "cpu"
        noise = make_noise(shape, seed=seed, generator=generator, deterministic=deterministic_noise,
                           origin=noise_origin, device=dev)
    x = noise.float()
    b = x.shape[0]
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((b,), t_cur, dtype=torch.float32, device=x.device)
        v = model_fn(x, t, z).float()
        x = x + (t_next - t_cur) * v
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"euler": sample}
