#!/usr/bin/env python3
"""NumPy/SciPy implementation of scopegym's STEM HAADF frame model, timed against the Rust one.

The model is the one in `physics/src/stem/` (DESIGN.md §4), step for step:

* probe: fine grid with pixel <= lambda/(4 alpha) and the same side length (`fine_geometry`),
  aperture x exp(-i chi) in Krivanek's Cartesian form, inverse FFT, |psi|^2 normalized, shifted
  to the centre, binned onto image pixels and normalized (Gauss-Hermite defocus sum when the
  energy spread is non-zero);
* kernel: the binned probe wrapped around the origin of the padded grid (margin = side/2 + 4,
  fast FFT sizes), real FFT, times the Gaussian source-size transfer exp(-2 pi^2 s^2 f^2);
* ideal image: bilinear splat of every atom with weight electrons * sigma_C (Z/6)^n / dx^2, real
  FFT convolution with the kernel, clipped at 0 (float32 like the Rust renderer);
* scan: per-row drift (constant velocity + random walk, sampled at each row's first and last
  pixel), Poisson line jitter with random sign, 1/sqrt(f) scan noise (16 log-spaced sinusoids
  normalized to the r.m.s.) plus mains pickup evaluated at nodes every 16 pixels and linearly
  interpolated; the ideal image is resampled bilinearly along the distorted path;
* counts: `numpy.random.Generator.poisson`, detector gain/offset; the dose map gets the frame's
  dose over the scanned rectangle.

Both sides use the bench configuration of `benches/stem_frame.rs`: 256 x 256 pixels of 0.2 A,
graphene (a = 2.46 A, no rotation) with one Si dopant on the field of view plus 2 nm on each
side, 60 keV, alpha = 30 mrad, C10 = 2 nm, C12 = 1 nm, C30 = 123 nm, C50 = 0.55 mm, source
sigma 0.35 A, 100 pA, 4 us dwell, 50 us flyback, default drift and scan noise, Poisson noise.

It times (a) a frame with an unchanged probe (median over --frames frames) and (b) a probe
recomputation (median over --probes recomputations, C10 alternating between 2 and 2.5 nm), then
runs `scopegym perf <scenario> --frames N --json` for the Rust numbers and prints both with
their ratio. Everything runs on one thread.

--check compares the NumPy model against reference arrays written by the Rust bench
(`SCOPEGYM_BENCH_DUMP=DIR cargo bench --bench stem_frame -- dump-only`): probe kernel, atoms
and a noiseless frame with drift, jitter and scan noise switched off.
"""

import os

# One thread for a fair comparison: set before NumPy/SciPy load their BLAS/OpenMP runtimes.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.fft as sfft  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# physics/src/constants.rs
PLANCK = 6.626_070_15e-34
ELEMENTARY_CHARGE = 1.602_176_634e-19
ELECTRON_MASS = 9.109_383_701_5e-31
SPEED_OF_LIGHT = 299_792_458.0
ELECTRON_REST_ENERGY_EV = 510_998.950_00

NODE = 16  # scan.rs: spacing of scan-noise nodes along a row, pixels

# Gauss-Hermite nodes and weights (optics.rs GH7) for the chromatic defocus sum.
GH7 = [
    (-3.750_439_717_725_742, 0.000_548_268_855_972_22),
    (-2.366_759_410_734_541, 0.030_757_123_967_586_5),
    (-1.154_405_394_739_968, 0.240_123_178_605_012_7),
    (0.0, 0.457_142_857_142_857_1),
    (1.154_405_394_739_968, 0.240_123_178_605_012_7),
    (2.366_759_410_734_541, 0.030_757_123_967_586_5),
    (3.750_439_717_725_742, 0.000_548_268_855_972_22),
]


def default_config():
    """The Rust config-struct defaults (OpticsConfig, BeamConfig, ScanConfig, DetectorConfig,
    DriftConfig, ScanNoiseConfig) with the bench's aberrations and specimen, SI units."""
    return {
        # OpticsConfig (c10/c12 from the bench; the rest defaults)
        "energy": 60e3,
        "alpha": 30e-3,
        "ab": dict(c10=2e-9, c12=1e-9, phi12=0.0, c21=0.0, phi21=0.0, c23=0.0, phi23=0.0, c30=123e-9, c50=0.55e-3),
        "source_size": 0.35e-10,
        "cc": 1e-3,
        "energy_spread": 0.0,
        # BeamConfig
        "current": 100e-12,
        # ScanConfig
        "rows": 256,
        "cols": 256,
        "dx": 0.2e-10,
        "dwell": 4e-6,
        "flyback": 50e-6,
        "center": (0.0, 0.0),
        # DetectorConfig
        "haadf_exponent": 1.7,
        "carbon_cross_section": 5e-23,
        "gain": 1.0,
        "offset": 0.0,
        "read_noise": 0.0,
        "salt_probability": 0.0,
        "salt_value": 65535.0,
        "shot_noise": True,
        # DriftConfig
        "drift_speed": 0.5e-9 / 60.0,
        "drift_direction": 0.5,
        "drift_diffusivity": 1e-22,
        # ScanNoiseConfig
        "jitter_pixels": 0.05,
        "noise_rms": 0.05e-10,
        "noise_components": 16,
        "noise_fmin": 10.0,
        "noise_fmax": 500.0,
        "mains_amplitude": 0.03e-10,
        "mains_frequency": 50.0,
        # SpecimenConfig: graphene, one Si replacing the C nearest the origin; DamageConfig cell
        "lattice_constant": 2.46e-10,
        "rotation": 0.0,
        "dopant_z": 14,
        "dose_map_cell": 1e-10,
    }


def quiet_config():
    """The bench config with drift, jitter, scan noise and shot noise off (`--check`)."""
    cfg = default_config()
    cfg.update(shot_noise=False, drift_speed=0.0, drift_diffusivity=0.0, jitter_pixels=0.0, noise_rms=0.0, mains_amplitude=0.0)
    return cfg


# ----------------------------------------------------------------------------------------------
# Optics (optics.rs)


def electron_wavelength(energy_ev):
    e = energy_ev * ELEMENTARY_CHARGE
    return PLANCK / math.sqrt(2.0 * ELECTRON_MASS * e * (1.0 + e / (2.0 * ELECTRON_MASS * SPEED_OF_LIGHT**2)))


def next_fast_len(n):
    """Smallest m >= n with prime factors 2, 3, 5 only (optics.rs `next_fast_len`)."""
    m = max(n, 1)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def defocus_spread(cfg):
    e = cfg["energy"]
    rel = (1.0 + e / ELECTRON_REST_ENERGY_EV) / (1.0 + e / (2.0 * ELECTRON_REST_ENERGY_EV))
    return cfg["cc"] * (cfg["energy_spread"] / 2.354_820_045) / e * rel


def geometric_radius(ab, alpha):
    return (
        abs(ab["c10"]) * alpha
        + ab["c12"] * alpha
        + (ab["c21"] + ab["c23"]) * alpha**2
        + abs(ab["c30"]) * alpha**3
        + abs(ab["c50"]) * alpha**5
    )


def fine_geometry(cfg, ab, dx, max_extent):
    """(subsampling m, fine side n, fine pixel) exactly as `ProbeCalculator::fine_geometry`."""
    lam = electron_wavelength(cfg["energy"])
    alpha = cfg["alpha"]
    limit = lam / (4.0 * alpha)
    m = max(int(math.ceil(dx / limit)), 1)
    fdx = dx / m
    chrom = 3.0 * defocus_spread(cfg) * alpha
    radius = geometric_radius(ab, alpha) + chrom + 12.0 * lam / alpha
    extent = min(max(4.0 * radius, 32.0 * lam / alpha), max(max_extent, 8.0 * dx))
    side = max(int(math.ceil(extent / dx)), 4)
    n = next_fast_len(side * m)
    while n % m != 0:
        side += 1
        n = next_fast_len(side * m)
    return m, n, fdx


def coherent_probe(cfg, ab, n, dx):
    """psi(r) = IFFT[A(k) exp(-i chi(k))] on an n x n grid (complex64, like the Rust f32 FFT).

    chi is evaluated only on the rows and columns inside the aperture band, as in Rust."""
    lam = electron_wavelength(cfg["energy"])
    alpha = cfg["alpha"]
    dk = 1.0 / (n * dx)
    kmax = alpha / lam
    idx = np.arange(n)
    kidx = np.where(idx <= n // 2, idx, idx - n).astype(np.float64)
    band = np.flatnonzero(np.abs(kidx * dk) <= kmax)
    t = kidx[band] * dk * lam  # scattering angle components
    tx = t[None, :]
    ty = t[:, None]
    t2 = tx * tx + ty * ty
    c12a, c12b = ab["c12"] * math.cos(2 * ab["phi12"]), ab["c12"] * math.sin(2 * ab["phi12"])
    c21a, c21b = ab["c21"] * math.cos(ab["phi21"]), ab["c21"] * math.sin(ab["phi21"])
    c23a, c23b = ab["c23"] * math.cos(3 * ab["phi23"]), ab["c23"] * math.sin(3 * ab["phi23"])
    chi = (2.0 * math.pi / lam) * (
        0.5 * (ab["c10"] * t2 + c12a * (tx * tx - ty * ty) + c12b * 2.0 * tx * ty)
        + (t2 * (c21a * tx + c21b * ty)) / 3.0
        + (c23a * (tx**3 - 3.0 * tx * ty * ty) + c23b * (3.0 * tx * tx * ty - ty**3)) / 3.0
        + 0.25 * ab["c30"] * t2 * t2
        + ab["c50"] * t2 * t2 * t2 / 6.0
    )
    inside = t2 <= alpha * alpha
    sub = np.zeros(chi.shape, np.complex64)
    sub.real = np.where(inside, np.cos(chi), 0.0)
    sub.imag = np.where(inside, -np.sin(chi), 0.0)
    field = np.zeros((n, n), np.complex64)
    field[np.ix_(band, band)] = sub
    return sfft.ifft2(field, overwrite_x=True)


def fine_intensity(cfg, ab, n, dx):
    """|psi|^2 on the fine grid, centred at (n/2, n/2), sum 1 (defocus-spread sum if any)."""
    sigma_f = defocus_spread(cfg)
    nodes = GH7 if sigma_f > 0.0 else GH7[3:4]
    norm_w = sum(w for _, w in nodes)
    out = np.zeros((n, n))
    for z, w in nodes:
        ab_z = dict(ab, c10=ab["c10"] + z * sigma_f)
        psi = coherent_probe(cfg, ab_z, n, dx)
        i = (psi.real * psi.real + psi.imag * psi.imag).astype(np.float64)
        out += i * (w / norm_w / max(i.sum(), np.finfo(float).tiny))
    h = n // 2
    return np.roll(out, (h, h), axis=(0, 1))


def binned_probe(cfg, ab, dx, max_extent):
    """The probe binned onto image pixels: (side, kernel summing to 1), centred at side/2."""
    m, n, fdx = fine_geometry(cfg, ab, dx, max_extent)
    fine = fine_intensity(cfg, ab, n, fdx)
    side = n // m
    k = fine.reshape(side, m, side, m).sum(axis=(1, 3))
    s = k.sum()
    if s > 0:
        k /= s
    return side, k


# ----------------------------------------------------------------------------------------------
# Specimen (specimen.rs: graphene lattice and a centred dopant)


def graphene(cfg, half):
    """Graphene atoms (x, y, Z) clipped to [-hx, hx] x [-hy, hy], in the Rust builder's order."""
    a, rot = cfg["lattice_constant"], cfg["rotation"]
    s3 = math.sqrt(3.0)
    c, s = math.cos(rot), math.sin(rot)
    a1 = (c * a - s * 0.0, s * a + c * 0.0)
    a2 = (c * (0.5 * a) - s * (0.5 * s3 * a), s * (0.5 * a) + c * (0.5 * s3 * a))
    reach = math.hypot(half[0], half[1]) + 2.0 * a
    det = a1[0] * a2[1] - a1[1] * a2[0]
    n1 = int(math.ceil(reach * math.hypot(*a2) / abs(det))) + 1
    n2 = int(math.ceil(reach * math.hypot(*a1) / abs(det))) + 1
    i, j, b = np.meshgrid(np.arange(-n1, n1 + 1), np.arange(-n2, n2 + 1), np.arange(2), indexing="ij")
    frac = np.array([0.0, 1.0 / 3.0])
    u = i.ravel() + frac[b.ravel()]
    v = j.ravel() + frac[b.ravel()]
    x = u * a1[0] + v * a2[0]
    y = u * a1[1] + v * a2[1]
    keep = (np.abs(x) <= half[0]) & (np.abs(y) <= half[1])
    x, y = x[keep], y[keep]
    z = np.full(x.shape, 6, dtype=np.int64)
    z[np.argmin(np.hypot(x, y))] = cfg["dopant_z"]  # "center" placement: the C nearest the origin
    return x, y, z


# ----------------------------------------------------------------------------------------------
# The simulator (sim.rs, haadf.rs, scan.rs)


class NumpyStem:
    def __init__(self, cfg, seed=7):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.ab = dict(cfg["ab"])
        rows, cols, dx = cfg["rows"], cfg["cols"], cfg["dx"]
        fov = (cols * dx, rows * dx)
        self.half = tuple(0.5 * fov[k] + abs(cfg["center"][k]) + 2e-9 for k in range(2))
        self.x, self.y, self.z = graphene(cfg, self.half)
        zz = np.arange(93)
        self.sigma_by_z = cfg["carbon_cross_section"] * (zz / 6.0) ** cfg["haadf_exponent"]
        self.electrons = cfg["current"] * cfg["dwell"] / ELEMENTARY_CHARGE
        # Drift state persists across frames.
        sp, d = cfg["drift_speed"], cfg["drift_direction"]
        self.drift_offset = np.zeros(2)
        self.drift_velocity = np.array([sp * math.cos(d), sp * math.sin(d)])
        self.clock = 0.0
        cell = cfg["dose_map_cell"]
        self.dose_shape = (max(int(math.ceil(2 * self.half[1] / cell)), 1), max(int(math.ceil(2 * self.half[0] / cell)), 1))
        self.dose = np.zeros(self.dose_shape)
        self.timings = {}
        self.ensure_probe()

    # -- probe ---------------------------------------------------------------------------------

    def set_aberrations(self, **kw):
        self.ab.update(kw)
        self.ensure_probe()

    def ensure_probe(self):
        """`StemSimulator::ensure_probe`: binned probe, its second moment, the kernel spectrum."""
        cfg = self.cfg
        rows, cols, dx = cfg["rows"], cfg["cols"], cfg["dx"]
        side, k = binned_probe(cfg, self.ab, dx, dx * max(rows, cols))
        self.kernel_side, self.kernel = side, k
        c = float(side // 2)
        r = np.arange(side) - c
        m2 = float((k * (r[None, :] ** 2 + r[:, None] ** 2)).sum())
        self.probe_sigma = math.hypot(math.sqrt(0.5 * m2) * dx, cfg["source_size"])
        self.set_probe(k, side, rows, cols, dx, cfg["source_size"])

    def set_probe(self, kernel, side, rows, cols, dx, source_sigma):
        """`HaadfRenderer::set_probe`: padded geometry, wrapped kernel, FFT, source blur."""
        margin = min(max(side // 2 + 4, 8), max(rows, cols) // 2)
        self.margin = margin
        self.prows = next_fast_len(rows + 2 * margin)
        self.pcols = next_fast_len(cols + 2 * margin)
        pr, pc = self.prows, self.pcols
        h = side // 2
        gy = (np.arange(side) - h) % pr
        gx = (np.arange(side) - h) % pc
        if side <= pr and side <= pc:  # indices are distinct: a plain scatter
            wrapped = np.zeros((pr, pc), np.float32)
            wrapped[np.ix_(gy, gx)] = kernel
        else:
            flat = (gy[:, None] * pc + gx[None, :]).ravel()
            wrapped = np.bincount(flat, weights=kernel.ravel(), minlength=pr * pc).astype(np.float32).reshape(pr, pc)
        spec = sfft.rfft2(wrapped)
        fy = sfft.fftfreq(pr, d=dx)
        fx = np.arange(pc // 2 + 1) / (pc * dx)
        s2 = 2.0 * math.pi**2 * source_sigma**2
        # exp(-s2 (fx² + fy²)) as an outer product of 1-D factors.
        transfer = (np.exp(-s2 * fy**2)[:, None] * np.exp(-s2 * fx**2)[None, :]).astype(np.float32)
        spec *= transfer  # irfft2 normalizes, so no 1/N factor here
        self.kernel_spec = spec
        # Per-geometry constants of the scan resampling (the Rust side keeps its buffers too).
        npr = -(-cols // NODE) + 1
        j = np.arange(cols)
        k = j // NODE
        t = (j % NODE) / NODE
        w = np.zeros((npr, cols))
        w[k, j] = 1.0 - t
        w[k + 1, j] += t
        self.node_interp = w  # nodes (rows × npr) @ w -> per-pixel linear interpolation
        self.col_frac = j * (1.0 / (cols - 1) if cols > 1 else 0.0)
        self.col_base = (margin + j).astype(np.float64)
        self.row_base = (margin + np.arange(rows)).astype(np.float64)

    # -- image formation -----------------------------------------------------------------------

    def render_ideal(self, shift):
        """`HaadfRenderer::render_ideal`: bilinear splat, FFT convolution, clip at 0."""
        cfg = self.cfg
        dx, rows, cols, m = cfg["dx"], cfg["rows"], cfg["cols"], self.margin
        pr, pc = self.prows, self.pcols
        u = (self.x + shift[0] - cfg["center"][0]) / dx + cols * 0.5 - 0.5 + m
        v = (self.y + shift[1] - cfg["center"][1]) / dx + rows * 0.5 - 0.5 + m
        ok = (u >= 0.0) & (v >= 0.0) & (u < pc - 1.0) & (v < pr - 1.0)
        u, v = u[ok], v[ok]
        w = (self.electrons / (dx * dx) * self.sigma_by_z[self.z[ok]]).astype(np.float32)
        i0 = v.astype(np.intp)
        j0 = u.astype(np.intp)
        fy = (v - i0).astype(np.float32)
        fx = (u - j0).astype(np.float32)
        base = i0 * pc + j0
        idx = np.concatenate((base, base + 1, base + pc, base + pc + 1))
        wts = np.concatenate((w * (1 - fx) * (1 - fy), w * fx * (1 - fy), w * (1 - fx) * fy, w * fx * fy))
        splat = np.bincount(idx, weights=wts, minlength=pr * pc).astype(np.float32).reshape(pr, pc)
        spec = sfft.rfft2(splat)
        spec *= self.kernel_spec
        ideal = sfft.irfft2(spec, s=(pr, pc), overwrite_x=True)
        np.maximum(ideal, 0.0, out=ideal)
        return ideal

    def distortion(self, t0):
        """`Distortion::generate`: per-row drift and jitter, scan-noise nodes; advances drift."""
        cfg, rng = self.cfg, self.rng
        rows, cols, dwell, fly = cfg["rows"], cfg["cols"], cfg["dwell"], cfg["flyback"]
        line = cols * dwell + fly
        row_span = (max(cols, 1) - 1) * dwell
        # 1/sqrt(f) components, normalized to the r.m.s., random phases; then mains.
        n = cfg["noise_components"]
        lo, hi = cfg["noise_fmin"], cfg["noise_fmax"]
        f = lo * (hi / lo) ** (np.arange(n) / (n - 1)) if n > 1 else np.full(n, lo)
        a = 1.0 / np.sqrt(f)
        norm = float((0.5 * a * a).sum())
        scale = cfg["noise_rms"] / math.sqrt(norm) if norm > 0 else 0.0
        omega = 2 * math.pi * f
        amp = np.repeat((a * scale)[:, None], 2, axis=1)
        phase = 2 * math.pi * rng.random((n, 2))
        if cfg["mains_amplitude"] > 0:
            ph = 2 * math.pi * rng.random()
            omega = np.append(omega, 2 * math.pi * cfg["mains_frequency"])
            amp = np.vstack((amp, [cfg["mains_amplitude"]] * 2))
            phase = np.vstack((phase, [ph, ph + 0.5 * math.pi]))
        # Drift: two steps per row (along the row, then the flyback), velocity plus random walk.
        dts = np.tile([row_span, line - row_span], rows)
        steps = self.drift_velocity[None, :] * dts[:, None]
        if cfg["drift_diffusivity"] > 0:
            steps += np.sqrt(2 * cfg["drift_diffusivity"] * dts)[:, None] * rng.standard_normal((2 * rows, 2))
        path = np.cumsum(steps, axis=0)  # displacement after each step, relative to the frame start
        drift_end = path[0::2]
        drift_start = np.vstack((np.zeros((1, 2)), path[1::2][:-1]))
        self.drift_offset = self.drift_offset + path[-1]
        jit = cfg["jitter_pixels"]
        if jit > 0:
            jitter = rng.poisson(jit, rows) * np.where(rng.random(rows) < 0.5, 1.0, -1.0)
        else:
            jitter = np.zeros(rows)
        # Scan noise at nodes every NODE pixels (plus the row end).
        npr = -(-cols // NODE) + 1
        # sin(w (t_row + k NODE dwell) + p) = sin(w t_row + p) cos(w k NODE dwell)
        #                                    + cos(w t_row + p) sin(w k NODE dwell): two matmuls.
        nodes = np.zeros((2, rows, npr))
        if np.any(amp != 0):
            tr = t0 + np.arange(rows) * line
            b = np.outer(omega, np.arange(npr) * (NODE * dwell))  # (components, nodes)
            cb, sb = np.cos(b), np.sin(b)
            for ax in range(2):
                a = np.outer(tr, omega) + phase[:, ax]  # (rows, components)
                nodes[ax] = (np.sin(a) * amp[:, ax]) @ cb + (np.cos(a) * amp[:, ax]) @ sb
        return drift_start, drift_end, jitter, nodes

    def record(self, ideal, dist):
        """`HaadfRenderer::record`: bilinear resampling along the distorted path, counts."""
        cfg, rng = self.cfg, self.rng
        dx = cfg["dx"]
        pr, pc = self.prows, self.pcols
        d0, d1, jitter, nodes = dist
        # Deflection minus drift along each row, in pixels, plus the nominal position.
        u = nodes[0] @ self.node_interp
        u -= d0[:, 0:1] + (d1[:, 0:1] - d0[:, 0:1]) * self.col_frac
        u *= 1.0 / dx
        u += self.col_base
        u += jitter[:, None]
        v = nodes[1] @ self.node_interp
        v -= d0[:, 1:2] + (d1[:, 1:2] - d0[:, 1:2]) * self.col_frac
        v *= 1.0 / dx
        v += self.row_base[:, None]
        np.clip(u, 0.0, pc - 2, out=u)
        np.clip(v, 0.0, pr - 2, out=v)
        i0 = v.astype(np.intp)
        j0 = u.astype(np.intp)
        fy = (v - i0).astype(np.float32)
        fx = (u - j0).astype(np.float32)
        b = i0 * pc + j0
        idf = ideal.ravel()
        a00, a01 = np.take(idf, b), np.take(idf, b + 1)
        a10, a11 = np.take(idf, b + pc), np.take(idf, b + pc + 1)
        top = a00 + (a01 - a00) * fx
        bot = a10 + (a11 - a10) * fx
        lam = top + (bot - top) * fy
        gain, offset = np.float32(cfg["gain"]), np.float32(cfg["offset"])
        noiseless = gain * lam + offset
        counts = rng.poisson(lam).astype(np.float32) if cfg["shot_noise"] else lam
        frame = gain * counts + offset
        if cfg["read_noise"] > 0:
            frame += (cfg["read_noise"] * rng.standard_normal(frame.shape)).astype(np.float32)
        if cfg["salt_probability"] > 0:
            frame = np.where(rng.random(frame.shape) < cfg["salt_probability"], np.float32(cfg["salt_value"]), frame)
        return frame, noiseless

    def add_dose_rect(self, x0, x1, y0, y1, dose):
        """`DoseMap::add_rect` (uniform dose, partially covered cells weighted)."""
        c = self.cfg["dose_map_cell"]
        ny, nx = self.dose_shape
        ox, oy = -self.half[0], -self.half[1]
        ix0 = min(max(math.floor((x0 - ox) / c), 0), nx)
        ix1 = min(max(math.ceil((x1 - ox) / c), 0), nx)
        iy0 = min(max(math.floor((y0 - oy) / c), 0), ny)
        iy1 = min(max(math.ceil((y1 - oy) / c), 0), ny)
        ax = ox + np.arange(ix0, ix1) * c
        ay = oy + np.arange(iy0, iy1) * c
        cx = np.clip((np.minimum(x1, ax + c) - np.maximum(x0, ax)) / c, 0, 1)
        cy = np.clip((np.minimum(y1, ay + c) - np.maximum(y0, ay)) / c, 0, 1)
        self.dose[iy0:iy1, ix0:ix1] += dose * cy[:, None] * cx[None, :]

    def acquire_frame(self):
        """`StemSimulator::acquire_frame` (sputtering off): ideal image, distortions, counts."""
        cfg = self.cfg
        tm = time.perf_counter
        t_a = tm()
        shift = self.drift_offset.copy()
        ideal = self.render_ideal(shift)
        t_b = tm()
        t0 = self.clock
        dist = self.distortion(t0)
        t_c = tm()
        frame, noiseless = self.record(ideal, dist)
        t_d = tm()
        dx = cfg["dx"]
        dose = self.electrons / (dx * dx)
        w, h = cfg["cols"] * dx, cfg["rows"] * dx
        x0 = cfg["center"][0] - 0.5 * w - shift[0]
        y0 = cfg["center"][1] - 0.5 * h - shift[1]
        self.add_dose_rect(x0, x0 + w, y0, y0 + h, dose)
        self.clock = t0 + cfg["rows"] * (cfg["cols"] * cfg["dwell"] + cfg["flyback"])
        t_e = tm()
        for key, dt in (("splat+fft", t_b - t_a), ("distortion", t_c - t_b), ("resample+poisson", t_d - t_c), ("dose map", t_e - t_d)):
            self.timings.setdefault(key, []).append(dt)
        self.last_ideal, self.last_noiseless = ideal, noiseless
        return frame


# ----------------------------------------------------------------------------------------------
# Timing


def median_ms(samples):
    return 1e3 * float(np.median(samples))


def time_numpy(frames, probes, seed):
    sim = NumpyStem(default_config(), seed)
    for _ in range(3):  # warm-up: page in buffers, FFT plan caches
        sim.acquire_frame()
    sim.timings.clear()
    ft = []
    for _ in range(frames):
        t = time.perf_counter()
        sim.acquire_frame()
        ft.append(time.perf_counter() - t)
    stages = {k: median_ms(v) for k, v in sim.timings.items()}
    # Poisson alone on this frame's expected counts, to show its share of the frame.
    lam = sim.last_noiseless
    pt = []
    for _ in range(max(5, frames // 2)):
        t = time.perf_counter()
        sim.rng.poisson(lam)
        pt.append(time.perf_counter() - t)
    stages["poisson alone"] = median_ms(pt)
    c10s = (2.5e-9, 2e-9)
    for i in range(2):
        sim.set_aberrations(c10=c10s[i % 2])
    prt = []
    for i in range(probes):
        t = time.perf_counter()
        sim.set_aberrations(c10=c10s[i % 2])
        prt.append(time.perf_counter() - t)
    return {
        "frame_ms": median_ms(ft),
        "probe_ms": median_ms(prt),
        "atoms": int(sim.x.size),
        "pixels": [sim.cfg["rows"], sim.cfg["cols"]],
        "padded": [sim.prows, sim.pcols],
        "kernel_side": sim.kernel_side,
        "frame_stages_ms": stages,
    }


def default_binary():
    target = os.environ.get("CARGO_TARGET_DIR")
    base = Path(target) if target else REPO / "target"
    return base / "release" / "scopegym"


def run_rust(binary, scenario, frames):
    """Runs `scopegym perf`; returns (dict or None, note)."""
    binary = Path(binary)
    if not binary.is_file():
        return None, f"Rust binary not found at {binary} (build it with `cargo build --release`, or pass --scopegym PATH)"
    if not Path(scenario).is_file():
        return None, f"scenario file not found: {scenario}"
    cmd = [str(binary), "perf", str(scenario), "--frames", str(frames), "--json"]
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"running {' '.join(cmd)} failed: {e}"
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        return None, f"`{' '.join(cmd)}` exited with {p.returncode} (is the `perf` subcommand there?): {err[-1] if err else ''}"
    for line in reversed(p.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "frame_ms" in obj:
                return obj, ""
    try:  # pretty-printed JSON over several lines
        obj = json.loads(p.stdout)
        if isinstance(obj, dict) and "frame_ms" in obj:
            return obj, ""
    except json.JSONDecodeError:
        pass
    return None, f"`{' '.join(cmd)}` printed no JSON object with frame_ms"


def fmt(v, w=10):
    return f"{v:>{w}.3f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"


# ----------------------------------------------------------------------------------------------
# --check


def load_npy(d, name):
    p = Path(d) / name
    return np.load(p) if p.is_file() else None


def check(rust_dump):
    """Compares the NumPy model with itself (conservation) and with the Rust reference arrays."""
    ok = True
    cfg = quiet_config()
    sim = NumpyStem(cfg, seed=0)
    sim.acquire_frame()
    nl = sim.last_noiseless
    # Conservation: the convolution keeps the total; the crop equals the ideal image.
    expected = sim.electrons / cfg["dx"] ** 2 * float(sim.sigma_by_z[sim.z].sum())
    total = float(sim.last_ideal.astype(np.float64).sum())
    m = sim.margin
    crop = sim.last_ideal[m : m + cfg["rows"], m : m + cfg["cols"]]
    print(f"numpy: {sim.x.size} atoms, kernel {sim.kernel_side}², padded grid {sim.prows}×{sim.pcols}, kernel sum {sim.kernel.sum():.6f}")
    print(f"numpy: ideal-image total {total:.6e} vs electrons·Σσ/dx² {expected:.6e} (rel {total / expected - 1:+.2e})")
    print(f"numpy: quiet noiseless frame == ideal crop: {bool(np.array_equal(crop, nl))}; mean {nl.mean():.4f} counts")
    ok &= abs(total / expected - 1) < 1e-3
    if not rust_dump:
        print("no Rust reference given: write one with\n"
              "  SCOPEGYM_BENCH_DUMP=/tmp/scopegym-dump cargo bench --bench stem_frame -- dump-only\n"
              "and rerun with --check --rust-dump /tmp/scopegym-dump")
        return ok
    atoms = load_npy(rust_dump, "atoms.npy")
    kern = load_npy(rust_dump, "probe_kernel.npy")
    frame = load_npy(rust_dump, "noiseless_quiet.npy")
    if atoms is None or kern is None or frame is None:
        print(f"missing reference arrays in {rust_dump}")
        return False
    same_n = atoms.shape[0] == sim.x.size
    print(f"atoms: rust {atoms.shape[0]}, numpy {sim.x.size}", end="")
    if same_n:
        dpos = max(np.abs(atoms[:, 0] - sim.x).max(), np.abs(atoms[:, 1] - sim.y).max())
        zeq = bool(np.array_equal(atoms[:, 2].astype(int), sim.z))
        print(f"; max position difference {dpos:.3e} m; same Z: {zeq}")
        ok &= dpos < 1e-15 and zeq
    else:
        print()
        ok = False
    probe = NumpyStem(default_config(), seed=0)
    if kern.shape == probe.kernel.shape:
        d = np.abs(kern - probe.kernel).max() / kern.max()
        print(f"probe kernel {kern.shape[0]}²: max |rust - numpy| / peak = {d:.2e}")
        ok &= d < 1e-4
    else:
        print(f"probe kernel shapes differ: rust {kern.shape}, numpy {probe.kernel.shape}")
        ok = False
    if frame.shape == nl.shape:
        d = np.abs(frame.astype(np.float64) - nl).max() / float(nl.max())
        rms = np.sqrt(np.mean((frame.astype(np.float64) - nl) ** 2)) / float(nl.mean())
        print(f"quiet noiseless frame: max |rust - numpy| / peak = {d:.2e}, r.m.s. / mean = {rms:.2e}")
        ok &= d < 1e-3
    else:
        print(f"frame shapes differ: rust {frame.shape}, numpy {nl.shape}")
        ok = False
    print("check:", "PASS" if ok else "FAIL")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default=str(REPO / "scenarios" / "stem_graphene_si.toml"), help="scenario for `scopegym perf`")
    ap.add_argument("--scopegym", default=None, help="scopegym binary (default: $CARGO_TARGET_DIR or ./target, release/scopegym)")
    ap.add_argument("--frames", type=int, default=30, help="frames to time on each side (>= 20 recommended)")
    ap.add_argument("--probes", type=int, default=20, help="probe recomputations to time")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print one JSON object with all numbers instead of the table")
    ap.add_argument("--no-rust", action="store_true", help="skip the Rust side")
    ap.add_argument("--check", action="store_true", help="validate the NumPy model (against --rust-dump if given) and exit")
    ap.add_argument("--rust-dump", default=None, help="directory written by SCOPEGYM_BENCH_DUMP=DIR cargo bench --bench stem_frame")
    args = ap.parse_args()

    if args.check:
        sys.exit(0 if check(args.rust_dump) else 1)

    py = time_numpy(args.frames, args.probes, args.seed)
    rust, note = (None, "skipped (--no-rust)") if args.no_rust else run_rust(args.scopegym or default_binary(), args.scenario, args.frames)

    def ratio(key):
        if rust and isinstance(rust.get(key), (int, float)) and rust[key] > 0:
            return py[key] / rust[key]
        return None

    env = {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__, "threads": 1}
    if args.json:
        out = {"numpy": py, "rust": rust, "ratio": {"frame": ratio("frame_ms"), "probe": ratio("probe_ms")}, "note": note or None, "env": env}
        print(json.dumps(out))
        return

    print(f"STEM HAADF frame, {py['pixels'][0]}×{py['pixels'][1]} px at 0.2 Å, graphene+Si ({py['atoms']} atoms), "
          f"probe kernel {py['kernel_side']}² on a {py['padded'][0]}×{py['padded'][1]} padded grid; one thread")
    print(f"NumPy {env['numpy']} / SciPy {env['scipy']}, Python {env['python']}")
    print()
    print(f"{'':28}{'numpy ms':>10}{'rust ms':>10}{'numpy/rust':>12}")
    rf = rust.get("frame_ms") if rust else None
    rp = rust.get("probe_ms") if rust else None
    print(f"{'frame (unchanged probe)':28}{fmt(py['frame_ms'])}{fmt(rf)}{fmt(ratio('frame_ms'), 12)}")
    print(f"{'probe recomputation':28}{fmt(py['probe_ms'])}{fmt(rp)}{fmt(ratio('probe_ms'), 12)}")
    print()
    st = py["frame_stages_ms"]
    print("NumPy frame stages (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
    print(f"note: the NumPy frame time includes Generator.poisson on {py['pixels'][0] * py['pixels'][1]} pixels "
          f"(about {st['poisson alone']:.2f} ms alone), as the Rust frame includes its own Poisson sampler.")
    if rust:
        print(f"Rust: `scopegym perf {Path(args.scenario).name}`: {rust.get('atoms')} atoms (the scenario may randomize "
              f"rotation, vacancies and aberrations; the probe kernel is clamped to the field either way)")
        if rust.get("pixels") and list(rust["pixels"]) != py["pixels"]:
            print(f"warning: the Rust scenario's frame is {rust['pixels']}, not {py['pixels']}: the ratio compares different work")
    else:
        print(f"note: no Rust numbers: {note}")


if __name__ == "__main__":
    main()
