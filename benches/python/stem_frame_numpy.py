#!/usr/bin/env python3
"""NumPy/SciPy implementation of scopegym's STEM HAADF frame model, timed against the Rust one.

The model is the one in `physics/src/stem/` (DESIGN.md §4), step for step:

* probe (`ProbeCalculator::fine_geometry`, `binned_probe`): fine pixel dx/m <= lambda/(4 alpha);
  a compact kernel of side 2 (ceil(r/dx) + 2) image pixels, r = geometric blur + chromatic term +
  3 lambda/alpha, clamped to [8, field/dx] and grown until side*m is a fast FFT length; aperture
  x exp(-i chi) in Krivanek's Cartesian form times the phase ramp that shifts the probe by
  (m-1)/2 fine pixels (so it sits on the centre of kernel bin side/2), inverse FFT (the rows in
  the aperture band, then all columns), |psi|^2 normalized, rolled to the centre, binned onto
  image pixels and normalized (Gauss-Hermite defocus sum when the energy spread is non-zero);
* kernel (`HaadfRenderer::set_probe`): the binned probe wrapped around the origin of the padded
  grid (margin = clamp(side/2 + 4, 8, max(rows, cols)/2), fast FFT sizes), real FFT, times the
  separable Gaussian source-size transfer exp(-2 pi^2 s^2 fy^2) exp(-2 pi^2 s^2 fx^2);
* ideal image (`render_ideal`): bilinear splat of every atom with weight
  electrons * sigma_C (Z/6)^n / dx^2, real FFT convolution with the kernel, clipped at 0 (float32
  like the Rust renderer). It is cached as in `StemSimulator::acquire_frame`: re-formed only
  when the probe or the specimen changed (`specimen_mut`), electrons per pixel changed, or the
  drift moved the specimen by more than 0.1 pixel since the image was formed; otherwise the
  drift relative to that shift is applied in the resampling. A drift of at most one pixel (each
  axis) from the last splat re-forms the image from the kept spectrum times the phase ramp
  exp(-2 pi i (kx dx/nx + ky dy/ny)) and one inverse FFT (`HaadfRenderer::shift_ideal`); past
  that, or when anything else changed, it is splatted and transformed again;
* scan (`Distortion::generate`): per-row drift relative to that reference shift (constant
  velocity + random walk, sampled at each row's first and last pixel), Poisson line jitter with
  random sign, 1/f scan noise (16 sinusoids of equal amplitude, one at a log-uniform random
  frequency in each of 16 equal log-width bands, so the PSD is 1/f; total r.m.s. as set) plus mains
  pickup evaluated at nodes every 16 pixels;
* resampling (`HaadfRenderer::record`): the sampling position is computed in float64 at the node
  columns, then linearly per 16-pixel node segment in float32 (start + step * t), clamped, and the
  ideal image is interpolated bilinearly in float32;
* counts: `numpy.random.Generator.poisson` (Rust: `rng::poisson_fill`, batched inversion below a
  mean of 10, PTRS above: same distribution, different streams), detector gain/offset; the dose
  map gets the frame's dose over the scanned rectangle.

Both sides use the bench configuration of `benches/stem_frame.rs`: 256 x 256 pixels of 0.2 A,
graphene (a = 2.46 A, no rotation) with one Si dopant in a periodic cell of about the field's
diagonal plus 2 nm on a side (its images do not reach the padded grid), 60 keV, alpha = 30
mrad, C10 = 2 nm, C12 = 1 nm, C30 = 123 nm, C50 = 0.55 mm, source sigma 0.35 A, 100 pA, 4 us
dwell, 50 us flyback, default drift and scan noise, Poisson noise.
The Rust side runs it as the scenario `stem_frame_bench.toml` next to this script (the default;
another scenario can be given, but its randomized aberrations change the kernel and padded grid).

It times, like `scopegym perf <scenario> --frames N --json` does on the Rust side (medians):
(a) `frame_ms`: frames with an unchanged probe and specimen (distortion + resampling + counts;
    when the drift passed 0.1 pixel the ideal image is re-formed, by the phase ramp or, every
    pixel of drift, a full render, on both sides);
(b) `frame_rerender_ms`: frames after `specimen_mut()` (splat + FFT convolution + resampling +
    counts; the probe is not recomputed);
(c) `probe_ms`: `set_aberrations` (C10 +- 0.1 nm) + `probe_kernel` (fine probe, binning, kernel
    spectrum with the source blur);
then runs `scopegym perf` and prints both with their ratios. Everything runs on one thread.

--check compares the NumPy model against reference arrays written by the Rust bench
(`SCOPEGYM_BENCH_DUMP=DIR cargo bench --bench stem_frame -- dump-only`): atoms, probe kernel,
a noiseless frame with drift, jitter and scan noise switched off and, when the dump has it, four
noiseless frames with a constant drift only (rendered, cached with a rigid shift, re-rendered).
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

NODE = 32  # scan.rs: spacing of scan-noise nodes along a row, pixels (set per config below)


def node_spacing(cfg):
    """scan.rs: at least 16 nodes per period of the fastest noise component, at most 32 px."""
    freqs = []
    if cfg["noise_components"] > 0:
        freqs.append(cfg["noise_fmax"])
    if cfg["mains_amplitude"] > 0:
        freqs.append(cfg["mains_frequency"])
    if not freqs:
        return 32
    return int(min(max(math.floor(1.0 / (16.0 * max(freqs) * cfg["dwell"])), 1), 32))

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


# Same rule as physics/src/stem/sim.rs: re-form the ideal image after this much drift (pixels).
RERENDER_DRIFT = 0.1
# `haadf::MAX_SPECTRAL_SHIFT`: the largest drift (pixels, each axis) from the last splat that is
# applied as a phase ramp to its spectrum.
MAX_SPECTRAL_SHIFT = 1.0

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
    """Smallest m >= n with prime factors 2, 3, 5 and 7 only (optics.rs `next_fast_len`)."""
    m = max(n, 1)
    while True:
        r = m
        for p in (2, 3, 5, 7):
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
    # Geometric blur + chromatic spread + 3 lambda/alpha of diffraction.
    chrom = 3.0 * defocus_spread(cfg) * alpha
    radius = geometric_radius(ab, alpha) + chrom + 3.0 * lam / alpha
    max_side = max(int(math.floor(max_extent / dx)), 8)
    side = min(max(2 * (int(math.ceil(radius / dx)) + 2), 8), max_side)
    while next_fast_len(side * m) != side * m:  # the fine grid must be a fast FFT length
        side += 1
    return m, side * m, fdx


def coherent_probe(cfg, ab, n, dx, shift):
    """psi(r - s) = IFFT[A(k) exp(-i chi(k)) exp(-2 pi i k.s)] on an n x n grid, s = (shift, shift)
    fine pixels (complex64, like the Rust f32 FFT).

    chi is evaluated only on the rows and columns inside the aperture band, and the inverse FFT
    transforms only the band's rows before all columns, as in Rust."""
    lam = electron_wavelength(cfg["energy"])
    alpha = cfg["alpha"]
    dk = 1.0 / (n * dx)
    kmax = alpha / lam
    idx = np.arange(n)
    kidx = np.where(idx <= n // 2, idx, idx - n).astype(np.float64)
    band = np.flatnonzero(np.abs(kidx * dk) <= kmax)
    kb = kidx[band]
    t = kb * dk * lam  # scattering angle components
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
    if shift != 0.0:
        chi += 2.0 * math.pi * shift * (kb[None, :] + kb[:, None]) / n
    inside = t2 <= alpha * alpha
    rows = np.zeros((band.size, n), np.complex64)
    rows[:, band] = np.where(inside, np.exp(-1j * chi), 0.0)
    rows = sfft.ifft(rows, axis=1, overwrite_x=True)
    field = np.zeros((n, n), np.complex64)
    field[band] = rows
    return sfft.ifft(field, axis=0, overwrite_x=True)


def fine_intensity(cfg, ab, n, dx, shift=0.0):
    """|psi|^2 on the fine grid, centred at (n/2 + shift, n/2 + shift), sum 1 (defocus-spread sum
    if any): `ProbeCalculator::fine_intensity_shifted`."""
    sigma_f = defocus_spread(cfg)
    nodes = GH7 if sigma_f > 0.0 else GH7[3:4]
    norm_w = sum(w for _, w in nodes)
    out = np.zeros((n, n))
    for z, w in nodes:
        ab_z = dict(ab, c10=ab["c10"] + z * sigma_f)
        psi = coherent_probe(cfg, ab_z, n, dx, shift)
        i = (psi.real * psi.real + psi.imag * psi.imag).astype(np.float64)
        out += i * (w / norm_w / max(i.sum(), np.finfo(float).tiny))
    h = n // 2
    return np.roll(out, (h, h), axis=(0, 1))


def binned_probe(cfg, ab, dx, max_extent):
    """The probe binned onto image pixels: (side, kernel summing to 1), centred on the centre of
    bin side/2 (fine index (side/2) m + (m-1)/2)."""
    m, n, fdx = fine_geometry(cfg, ab, dx, max_extent)
    fine = fine_intensity(cfg, ab, n, fdx, 0.5 * (m - 1.0))
    side = n // m
    k = fine.reshape(side, m, side, m).sum(axis=(1, 3))
    s = k.sum()
    if s > 0:
        k /= s
    return side, k


# ----------------------------------------------------------------------------------------------
# Specimen (specimen.rs: graphene lattice and a centred dopant)


def graphene(cfg, size):
    """Graphene atoms (x, y, Z) of the periodic cell of sides about `size` (specimen.rs `build`:
    a whole number of periods a along a1 and sqrt(3) a across it, the lattice point at the
    origin, atoms centred on it), in the Rust builder's order."""
    a, rot = cfg["lattice_constant"], cfg["rotation"]
    unit = 0.5 * (a * a + 0.0 * 0.0)
    len_p, len_t = math.sqrt(2.0 * unit), math.sqrt(6.0 * unit)  # a1 = (1, 0), t = (-1, 2)
    k0 = max(int(round(size[0] / len_p)), 1)
    k1 = max(int(round(size[1] / len_t)), 1)
    l1, l2 = k0 * len_p, k1 * len_t
    p1, p2 = (k0, 0), (-k1, 2 * k1)
    d = p1[0] * p2[1] - p2[0] * p1[1]
    basis = [(0.0, 0.0), (1.0 / 3.0, 1.0 / 3.0)]
    xi, eta = [], []
    for i in range(min(0, p1[0], p2[0], p1[0] + p2[0]), max(0, p1[0], p2[0], p1[0] + p2[0]) + 1):
        for j in range(min(0, p1[1], p2[1], p1[1] + p2[1]), max(0, p1[1], p2[1], p1[1] + p2[1]) + 1):
            nu = p2[1] * i - p2[0] * j
            nv = -p1[1] * i + p1[0] * j
            if not (0 <= nu < d and 0 <= nv < d):
                continue
            for f in basis:
                u = (float(nu) + float(p2[1]) * f[0] - float(p2[0]) * f[1]) / float(d)
                v = (float(nv) - float(p1[1]) * f[0] + float(p1[0]) * f[1]) / float(d)
                xi.append((u - math.floor(u + 0.5)) * l1)
                eta.append((v - math.floor(v + 0.5)) * l2)
    xi, eta = np.array(xi), np.array(eta)
    s, c = math.sin(rot), math.cos(rot)
    x = c * xi - s * eta
    y = s * xi + c * eta
    z = np.full(x.shape, 6, dtype=np.int64)
    z[np.argmin(np.hypot(x, y))] = cfg["dopant_z"]  # "center" placement: the C nearest the origin
    return x, y, z, (l1, l2)


# ----------------------------------------------------------------------------------------------
# The simulator (sim.rs, haadf.rs, scan.rs)


class NumpyStem:
    def __init__(self, cfg, seed=7):
        global NODE
        NODE = node_spacing(cfg)
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.ab = dict(cfg["ab"])
        rows, cols, dx = cfg["rows"], cfg["cols"], cfg["dx"]
        fov = (cols * dx, rows * dx)
        side = math.hypot(fov[0], fov[1]) + 2e-9  # sim.rs: the auto-sized cell
        self.x, self.y, self.z, self.cell_size = graphene(cfg, (side, side))
        zz = np.arange(93)
        self.sigma_by_z = cfg["carbon_cross_section"] * (zz / 6.0) ** cfg["haadf_exponent"]
        # Drift state persists across frames.
        sp, d = cfg["drift_speed"], cfg["drift_direction"]
        self.drift_offset = np.zeros(2)
        self.drift_velocity = np.array([sp * math.cos(d), sp * math.sin(d)])
        self.clock = 0.0
        # The dose map: periodic on the specimen cell (unrotated here), whole bins across it.
        cell = cfg["dose_map_cell"]
        l1, l2 = self.cell_size
        self.dose_shape = (max(int(round(l2 / cell)), 1), max(int(round(l1 / cell)), 1))
        self.dose_bin = (l1 / self.dose_shape[1], l2 / self.dose_shape[0])
        self.dose = np.zeros(self.dose_shape)
        # The ideal-image cache (`StemSimulator::{ideal_valid, ideal_shift, rendered_electrons}`).
        self.ideal = None
        self.ideal_valid = False
        self.ideal_shift = np.zeros(2)
        self.rendered_electrons = 0.0
        self.renders = 0
        self.timings = {}
        self.probe_dirty = True
        self.ensure_probe()

    def electrons(self):
        """Electrons per pixel (`StemSimulator::electrons(dwell)`)."""
        return self.cfg["current"] * self.cfg["dwell"] / ELEMENTARY_CHARGE

    def specimen_mut(self):
        """`StemSimulator::specimen_mut`: the specimen may change, so the ideal image is stale."""
        self.ideal_valid = False
        return self

    # -- probe ---------------------------------------------------------------------------------

    def set_aberrations(self, **kw):
        """`StemSimulator::set_aberrations`: marks the probe dirty if anything changed."""
        new = dict(self.ab, **kw)
        if new != self.ab:
            self.ab = new
            self.probe_dirty = True

    def probe_kernel(self):
        """`StemSimulator::probe_kernel`: (side, kernel), recomputing the probe if needed."""
        self.ensure_probe()
        return self.kernel_side, self.kernel

    def ensure_probe(self):
        """`StemSimulator::ensure_probe`: binned probe, its second moment, the kernel spectrum."""
        if not self.probe_dirty:
            return
        cfg = self.cfg
        rows, cols, dx = cfg["rows"], cfg["cols"], cfg["dx"]
        side, k = binned_probe(cfg, self.ab, dx, dx * max(rows, cols))
        self.kernel_side, self.kernel = side, k
        c = float(side // 2)
        r = np.arange(side) - c
        m2 = float((k * (r[None, :] ** 2 + r[:, None] ** 2)).sum())
        self.probe_sigma = math.hypot(math.sqrt(0.5 * m2) * dx, cfg["source_size"])
        self.set_probe(k, side, rows, cols, dx, cfg["source_size"])
        self.probe_dirty = False
        self.ideal_valid = False

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
        # The separable transfer exp(-s2 fy²) exp(-s2 fx²) as an outer product of 1-D factors.
        transfer = np.exp(-s2 * fy**2).astype(np.float32)[:, None] * np.exp(-s2 * fx**2).astype(np.float32)[None, :]
        spec *= transfer  # irfft2 normalizes, so no 1/N factor here
        self.kernel_spec = spec
        self.base_spec = None  # the spectrum of the last splat, for `shift_ideal`
        self.base_shift = None
        # Per-geometry constants of the scan resampling (the Rust side keeps its buffers too).
        npr = -(-cols // NODE) + 1
        kcols = np.arange(npr) * NODE  # columns of the noise nodes (the last may be past the row)
        self.node_frac = kcols * (1.0 / (cols - 1) if cols > 1 else 0.0)
        self.node_ucol = (margin + kcols).astype(np.float64)
        self.row_base = (margin + np.arange(rows)).astype(np.float64)
        self.seg_t = np.arange(NODE, dtype=np.float32)

    # -- image formation -----------------------------------------------------------------------

    def grid_coords(self, shift):
        """`FrameGeometry::to_grid` of every atom shifted by `shift` (m): padded-grid (u, v)."""
        cfg = self.cfg
        dx, rows, cols, m = cfg["dx"], cfg["rows"], cfg["cols"], self.margin
        u = (self.x + shift[0] - cfg["center"][0]) / dx + cols * 0.5 - 0.5 + m
        v = (self.y + shift[1] - cfg["center"][1]) / dx + rows * 0.5 - 0.5 + m
        return u, v

    def splat_mask(self, shift):
        """The atoms that `render_ideal` splats (inside the padded grid)."""
        u, v = self.grid_coords(shift)
        return (u >= 0.0) & (v >= 0.0) & (u < self.pcols - 1.0) & (v < self.prows - 1.0)

    def render_ideal(self, shift, electrons):
        """`HaadfRenderer::render_ideal`: bilinear splat, FFT convolution, clip at 0."""
        dx = self.cfg["dx"]
        pr, pc = self.prows, self.pcols
        u, v = self.grid_coords(shift)
        ok = (u >= 0.0) & (v >= 0.0) & (u < pc - 1.0) & (v < pr - 1.0)
        u, v = u[ok], v[ok]
        w = (electrons / (dx * dx) * self.sigma_by_z[self.z[ok]]).astype(np.float32)
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
        # Kept for `shift_ideal` (so this inverse may not overwrite it).
        self.base_spec = spec
        self.base_shift = np.array(shift, dtype=np.float64)
        ideal = sfft.irfft2(spec, s=(pr, pc))
        np.maximum(ideal, 0.0, out=ideal)
        return ideal

    def shift_ideal(self, shift):
        """`HaadfRenderer::shift_ideal`: the ideal image for drift `shift` (m) from the kept
        spectrum times a phase ramp, or None when there is none or the shift from its splat
        exceeds MAX_SPECTRAL_SHIFT pixels."""
        if self.base_spec is None:
            return None
        d = (np.asarray(shift) - self.base_shift) / self.cfg["dx"]
        if not (abs(d[0]) <= MAX_SPECTRAL_SHIFT and abs(d[1]) <= MAX_SPECTRAL_SHIFT):
            return None
        pr, pc = self.prows, self.pcols
        ky = np.arange(pr, dtype=np.float64)
        ky[ky > pr // 2] -= pr
        ry = np.exp(-2j * math.pi * ky * d[1] / pr).astype(np.complex64)
        rx = np.exp(-2j * math.pi * np.arange(pc // 2 + 1) * d[0] / pc).astype(np.complex64)
        spec = self.base_spec * (ry[:, None] * rx[None, :])  # the order of the Rust product
        ideal = sfft.irfft2(spec, s=(pr, pc), overwrite_x=True)
        np.maximum(ideal, 0.0, out=ideal)
        return ideal

    def distortion(self, t0, reference):
        """`Distortion::generate`: per-row drift relative to `reference` (the shift the ideal image
        was rendered with) and jitter, scan-noise nodes; advances the drift."""
        cfg, rng = self.cfg, self.rng
        rows, cols, dwell, fly = cfg["rows"], cfg["cols"], cfg["dwell"], cfg["flyback"]
        line = cols * dwell + fly
        row_span = (max(cols, 1) - 1) * dwell
        # 1/f components: one per equal log-width band at a log-uniform random frequency in it,
        # equal amplitudes rms·sqrt(2/n), random phases; then mains.
        n = cfg["noise_components"]
        lo, hi = cfg["noise_fmin"], cfg["noise_fmax"]
        width = math.log(hi / lo) / max(n, 1)
        f = lo * np.exp(width * (np.arange(n) + rng.random(n)))
        a = cfg["noise_rms"] * math.sqrt(2.0 / n) if n > 0 else 0.0
        omega = 2 * math.pi * f
        amp = np.full((n, 2), a)
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
        base = self.drift_offset - reference
        drift_end = base + path[0::2]
        drift_start = base + np.vstack((np.zeros((1, 2)), path[1::2][:-1]))
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

    def resample(self, ideal, dist):
        """`HaadfRenderer::record`, pass 1: expected counts along the distorted scan path.

        The position is evaluated in float64 at the node columns; within each 16-pixel node
        segment it is start + step * t in float32 (drift is linear in time along a row, the scan
        noise linear between nodes), clamped, then bilinear interpolation in float32."""
        cfg = self.cfg
        rows, cols = cfg["rows"], cfg["cols"]
        inv_dx = 1.0 / cfg["dx"]
        pr, pc = self.prows, self.pcols
        d0, d1, jitter, nodes = dist
        f = self.node_frac
        # (rows × nodes) positions on the padded grid, float64, in the Rust evaluation order.
        un = (self.node_ucol[None, :] + jitter[:, None]) + (nodes[0] - (d0[:, 0:1] + (d1[:, 0:1] - d0[:, 0:1]) * f)) * inv_dx
        vn = self.row_base[:, None] + (nodes[1] - (d0[:, 1:2] + (d1[:, 1:2] - d0[:, 1:2]) * f)) * inv_dx
        ua = un[:, :-1].astype(np.float32)
        va = vn[:, :-1].astype(np.float32)
        du = ((un[:, 1:] - un[:, :-1]) / NODE).astype(np.float32)
        dv = ((vn[:, 1:] - vn[:, :-1]) / NODE).astype(np.float32)
        t = self.seg_t
        u = (ua[:, :, None] + du[:, :, None] * t).reshape(rows, -1)[:, :cols]
        v = (va[:, :, None] + dv[:, :, None] * t).reshape(rows, -1)[:, :cols]
        np.clip(u, np.float32(0.0), np.float32(pc - 2), out=u)
        np.clip(v, np.float32(0.0), np.float32(pr - 2), out=v)
        fu = np.floor(u)
        fv = np.floor(v)
        b = fv.astype(np.intp)
        b *= pc
        b += fu.astype(np.intp)
        fx = u - fu
        fy = v - fv
        gx = 1.0 - fx
        idf = ideal.ravel()
        top = np.take(idf, b) * gx
        top += np.take(idf, b + 1) * fx
        b += pc
        bot = np.take(idf, b) * gx
        bot += np.take(idf, b + 1) * fx
        top *= 1.0 - fy
        bot *= fy
        top += bot
        return top

    def counts(self, lam):
        """`HaadfRenderer::record`, passes 2-3: counts, gain/offset, read and salt noise."""
        cfg, rng = self.cfg, self.rng
        gain, offset = np.float32(cfg["gain"]), np.float32(cfg["offset"])
        counts = rng.poisson(lam).astype(np.float32) if cfg["shot_noise"] else lam
        frame = gain * counts + offset
        noiseless = gain * lam + offset
        if cfg["read_noise"] > 0:
            frame += (cfg["read_noise"] * rng.standard_normal(frame.shape)).astype(np.float32)
        if cfg["salt_probability"] > 0:
            frame = np.where(rng.random(frame.shape) < cfg["salt_probability"], np.float32(cfg["salt_value"]), frame)
        return frame, noiseless

    def add_dose_rect(self, x0, x1, y0, y1, dose):
        """`DoseMap::add_rect` (uniform dose, partially covered bins weighted, wrapped onto the
        periodic cell; the cell is unrotated here, so the coverage is a product)."""
        cx_, cy_ = self.dose_bin
        ny, nx = self.dose_shape
        ox, oy = -0.5 * self.cell_size[0], -0.5 * self.cell_size[1]
        ix = np.arange(math.floor((x0 - ox) / cx_), math.floor((x1 - ox) / cx_) + 1)
        iy = np.arange(math.floor((y0 - oy) / cy_), math.floor((y1 - oy) / cy_) + 1)
        ax = ox + ix * cx_
        ay = oy + iy * cy_
        fx = np.clip((np.minimum(x1, ax + cx_) - np.maximum(x0, ax)) / cx_, 0, 1)
        fy = np.clip((np.minimum(y1, ay + cy_) - np.maximum(y0, ay)) / cy_, 0, 1)
        np.add.at(self.dose, (np.mod(iy, ny)[:, None], np.mod(ix, nx)[None, :]), dose * fy[:, None] * fx[None, :])

    def acquire_frame(self):
        """`StemSimulator::acquire_frame` (sputtering off): cached or re-rendered ideal image,
        distortions, resampling, counts, dose."""
        cfg = self.cfg
        dx = cfg["dx"]
        tm = time.perf_counter
        t_a = tm()
        self.ensure_probe()
        epp = self.electrons()
        shift = self.drift_offset.copy()
        moved = float(np.max(np.abs(shift - self.ideal_shift)))
        stale = not self.ideal_valid or epp != self.rendered_electrons
        rendered = stale or moved > RERENDER_DRIFT * dx
        if rendered:
            ideal = None if stale else self.shift_ideal(shift)
            self.ideal = self.render_ideal(shift, epp) if ideal is None else ideal
            self.ideal_shift = shift
            self.rendered_electrons = epp
            self.ideal_valid = True
            self.renders += 1
        t_b = tm()
        t0 = self.clock
        dist = self.distortion(t0, self.ideal_shift)
        t_c = tm()
        lam = self.resample(self.ideal, dist)
        t_d = tm()
        frame, noiseless = self.counts(lam)
        t_e = tm()
        dose = epp / (dx * dx)
        w, h = cfg["cols"] * dx, cfg["rows"] * dx
        x0 = cfg["center"][0] - 0.5 * w - shift[0]
        y0 = cfg["center"][1] - 0.5 * h - shift[1]
        self.add_dose_rect(x0, x0 + w, y0, y0 + h, dose)
        self.clock = t0 + cfg["rows"] * (cfg["cols"] * cfg["dwell"] + cfg["flyback"])
        t_f = tm()
        stages = [("distortion", t_c - t_b), ("resample", t_d - t_c), ("poisson+gain", t_e - t_d), ("dose map", t_f - t_e)]
        if rendered:
            stages.insert(0, ("render (splat+FFT, or phase ramp+inverse FFT)", t_b - t_a))
        for key, dt in stages:
            self.timings.setdefault(key, []).append(dt)
        self.last_noiseless = noiseless
        return frame


# ----------------------------------------------------------------------------------------------
# Timing


def median_ms(samples):
    return 1e3 * float(np.median(samples))


def time_numpy(frames, seed):
    """The NumPy counterpart of `scopegym perf` (src/main.rs `perf`), same loops and medians."""
    sim = NumpyStem(default_config(), seed)
    for _ in range(3):  # warm-up: page in buffers, FFT plan caches
        sim.acquire_frame()
    # (a) frames with the ideal image cached (it is re-rendered when the drift passes a pixel).
    sim.timings.clear()
    r0 = sim.renders
    ft = []
    for _ in range(frames):
        t = time.perf_counter()
        sim.acquire_frame()
        ft.append(time.perf_counter() - t)
    cached_renders = sim.renders - r0
    stages_cached = {k: median_ms(v) for k, v in sim.timings.items()}
    # (b) frames after the specimen changed: splat + FFT convolution every frame, probe kept.
    sim.timings.clear()
    rt = []
    for _ in range(frames):
        t = time.perf_counter()
        sim.specimen_mut()
        sim.acquire_frame()
        rt.append(time.perf_counter() - t)
    stages_rerender = {k: median_ms(v) for k, v in sim.timings.items()}
    # (c) probe recomputation: C10 ± 0.1 nm around the configured value, as `perf` does.
    base = sim.ab["c10"]
    prt = []
    for k in range(min(frames, 50)):
        c10 = base + (1e-10 if k % 2 == 0 else -1e-10)
        t = time.perf_counter()
        sim.set_aberrations(c10=c10)
        sim.probe_kernel()
        prt.append(time.perf_counter() - t)
    return {
        "frame_ms": median_ms(ft),
        "frame_rerender_ms": median_ms(rt),
        "probe_ms": median_ms(prt),
        "frames": frames,
        "renders_in_cached_loop": cached_renders,
        "atoms": int(sim.x.size),
        "pixels": [sim.cfg["rows"], sim.cfg["cols"]],
        "padded": [sim.prows, sim.pcols],
        "kernel_side": sim.kernel_side,
        "frame_stages_ms": stages_cached,
        "rerender_stages_ms": stages_rerender,
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


# `benches/stem_frame.rs::COARSE_DX`: image pixel of the coarse reference probe kernel (m = 2).
COARSE_DX = 0.5e-10
# `benches/stem_frame.rs::DRIFT_SPEED`: the drift-only reference frames.
DRIFT_SPEED = 0.05e-10
DRIFT_FRAMES = 4


def drift_config():
    """`quiet_config` with a constant drift (no random walk), as the bench's `drift_config`."""
    cfg = quiet_config()
    cfg.update(drift_speed=DRIFT_SPEED)
    return cfg


def load_npy(d, name):
    p = Path(d) / name
    return np.load(p) if p.is_file() else None


def centroid_offset(k):
    """Centroid of a kernel relative to the centre of bin side/2, in image pixels (x, y), over
    the window symmetric about that bin (for an even side, row and column 0 have no partner)."""
    side = k.shape[0]
    h = side // 2
    lo = max(2 * h - (side - 1), 0)
    w = k[lo:, lo:]
    r = np.arange(lo, side) - h
    s = w.sum()
    return float((w.sum(axis=0) * r).sum() / s), float((w.sum(axis=1) * r).sum() / s)


def rigid_shift_errors(sim, s):
    """Max |resampled - re-rendered| / peak for a rigid specimen shift `s` (m) applied in the
    resampling of the image rendered at 0 (the cached path), with the right and the wrong sign."""
    cfg = sim.cfg
    rows, cols, m = cfg["rows"], cfg["cols"], sim.margin
    e = sim.electrons()
    ideal0 = sim.render_ideal(np.zeros(2), e)
    ref = sim.render_ideal(np.asarray(s), e)[m : m + rows, m : m + cols].astype(np.float64)
    npr = -(-cols // NODE) + 1
    out = []
    for sign in (1.0, -1.0):
        d = np.tile(sign * np.asarray(s), (rows, 1))
        lam = sim.resample(ideal0, (d, d, np.zeros(rows), np.zeros((2, rows, npr))))
        out.append(float(np.abs(lam - ref).max() / ref.max()))
    return out


def check(rust_dump):
    """Compares the NumPy model with itself (conservation, caching) and with the Rust arrays."""
    ok = True
    cfg = quiet_config()
    sim = NumpyStem(cfg, seed=0)
    sim.acquire_frame()
    nl = sim.last_noiseless
    # Conservation: the convolution keeps the total; the crop equals the ideal image.
    # (atoms outside the padded grid are not splatted, as in Rust: they only reach its margin)
    inside = sim.splat_mask(np.zeros(2))
    expected = sim.electrons() / cfg["dx"] ** 2 * float(sim.sigma_by_z[sim.z[inside]].sum())
    total = float(sim.ideal.astype(np.float64).sum())
    m = sim.margin
    crop = sim.ideal[m : m + cfg["rows"], m : m + cfg["cols"]]
    cx, cy = centroid_offset(sim.kernel)
    print(f"numpy: {sim.x.size} atoms, kernel {sim.kernel_side}², margin {m}, padded grid {sim.prows}×{sim.pcols}, "
          f"kernel sum {sim.kernel.sum():.6f}, centroid − bin centre ({cx:+.1e}, {cy:+.1e}) px")
    print(f"numpy: ideal-image total {total:.6e} vs electrons·Σσ/dx² over the {int(inside.sum())} atoms on the padded grid "
          f"{expected:.6e} (rel {total / expected - 1:+.2e})")
    print(f"numpy: quiet noiseless frame == ideal crop: {bool(np.array_equal(crop, nl))}; mean {nl.mean():.4f} counts")
    ok &= abs(total / expected - 1) < 1e-3 and bool(np.array_equal(crop, nl))
    # The cached path: a sub-pixel rigid drift applied in the resampling vs a re-render.
    dx = cfg["dx"]
    good, bad = rigid_shift_errors(sim, (0.9 * dx, -0.5 * dx))
    print(f"numpy: rigid shift (0.9, -0.5) px in the resampling vs re-rendered: max dev / peak {good:.2e} "
          f"(wrong sign: {bad:.2e})")
    ok &= good < 0.25 * bad
    if not rust_dump:
        print("no Rust reference given: write one with\n"
              "  SCOPEGYM_BENCH_DUMP=/tmp/scopegym-dump cargo bench --bench stem_frame -- dump-only\n"
              "and rerun with --check --rust-dump /tmp/scopegym-dump")
        return ok
    atoms = load_npy(rust_dump, "atoms.npy")
    kern = load_npy(rust_dump, "probe_kernel.npy")
    frame = load_npy(rust_dump, "noiseless_quiet.npy")
    drift = load_npy(rust_dump, "noiseless_drift.npy")
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
        rx, ry = centroid_offset(kern)
        print(f"probe kernel {kern.shape[0]}² (both): max |rust - numpy| / peak = {d:.2e}; "
              f"rust centroid − bin centre ({rx:+.1e}, {ry:+.1e}) px")
        ok &= d < 1e-4
    else:
        print(f"probe kernel shapes differ: rust {kern.shape}, numpy {probe.kernel.shape}")
        ok = False
    coarse = load_npy(rust_dump, "probe_kernel_coarse.npy")
    if coarse is None:
        print("probe_kernel_coarse.npy not in the dump (older bench): sub-pixel centring not compared")
    else:
        pcfg = default_config()
        mc, nc, _ = fine_geometry(pcfg, pcfg["ab"], COARSE_DX, 256 * COARSE_DX)
        sc, kc = binned_probe(pcfg, pcfg["ab"], COARSE_DX, 256 * COARSE_DX)
        nx_, ny_ = centroid_offset(kc)
        print(f"numpy probe at {COARSE_DX * 1e10:g} Å pixels: m = {mc}, fine grid {nc}, kernel {sc}², "
              f"centroid − bin centre ({nx_:+.1e}, {ny_:+.1e}) px", end="")
        ok &= max(abs(nx_), abs(ny_)) < 1e-3
        if coarse.shape == kc.shape:
            d = np.abs(coarse - kc).max() / coarse.max()
            rx, ry = centroid_offset(coarse)
            print(f"; rust: centroid ({rx:+.1e}, {ry:+.1e}) px, max |rust - numpy| / peak = {d:.2e}")
            ok &= d < 1e-4
        else:
            print(f"; shapes differ: rust {coarse.shape}, numpy {kc.shape}")
            ok = False
    if frame.shape == nl.shape:
        d = np.abs(frame.astype(np.float64) - nl).max() / float(nl.max())
        rms = np.sqrt(np.mean((frame.astype(np.float64) - nl) ** 2)) / float(nl.mean())
        print(f"quiet noiseless frame: max |rust - numpy| / peak = {d:.2e}, r.m.s. / mean = {rms:.2e}")
        ok &= d < 1e-3
    else:
        print(f"frame shapes differ: rust {frame.shape}, numpy {nl.shape}")
        ok = False
    if drift is None:
        print("noiseless_drift.npy not in the dump (older bench): drift frames not compared")
    else:
        ds = NumpyStem(drift_config(), seed=0)
        devs, paths = [], []
        for k in range(min(DRIFT_FRAMES, drift.shape[0])):
            r0 = ds.renders
            ds.acquire_frame()
            paths.append("rendered" if ds.renders > r0 else "cached")
            ref = drift[k].astype(np.float64)
            devs.append(float(np.abs(ref - ds.last_noiseless).max() / ref.max()))
        print(f"drift-only noiseless frames ({DRIFT_SPEED * 1e10:g} Å/s): numpy ideal image "
              + ", ".join(f"{i}: {p}" for i, p in enumerate(paths))
              + "; max |rust - numpy| / peak " + ", ".join(f"{d:.2e}" for d in devs))
        # 0.069 px of drift per frame against the 0.1 px re-render rule.
        ok &= paths == ["rendered", "cached", "rendered", "cached"] and max(devs) < 1e-3
    print("check:", "PASS" if ok else "FAIL")
    return ok


# The timed numbers both sides report.
TIMED = ("frame_ms", "frame_rerender_ms", "probe_ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default=str(Path(__file__).resolve().parent / "stem_frame_bench.toml"),
                    help="scenario for `scopegym perf` (default: stem_frame_bench.toml, the configuration timed here)")
    ap.add_argument("--scopegym", default=None, help="scopegym binary (default: $CARGO_TARGET_DIR or ./target, release/scopegym)")
    ap.add_argument("--frames", type=int, default=30, help="frames per loop on each side (>= 20 recommended; probe loop: at most 50)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="alternate NumPy and Rust this many times; report the best median of each")
    ap.add_argument("--json", action="store_true", help="print one JSON object with all numbers instead of the table")
    ap.add_argument("--no-rust", action="store_true", help="skip the Rust side")
    ap.add_argument("--check", action="store_true", help="validate the NumPy model (against --rust-dump if given) and exit")
    ap.add_argument("--rust-dump", default=None, help="directory written by SCOPEGYM_BENCH_DUMP=DIR cargo bench --bench stem_frame")
    args = ap.parse_args()

    if args.check:
        sys.exit(0 if check(args.rust_dump) else 1)

    # NumPy and Rust alternate --repeats times; each number is the best of its medians (host noise
    # on a shared machine only ever adds time).
    py, rust, note = None, None, "skipped (--no-rust)" if args.no_rust else ""
    for _ in range(max(args.repeats, 1)):
        p1 = time_numpy(args.frames, args.seed)
        py = p1 if py is None else {k: (min(v, p1[k]) if k in TIMED else v) for k, v in py.items()}
        if not args.no_rust:
            r1, note = run_rust(args.scopegym or default_binary(), args.scenario, args.frames)
            if r1 is None:
                rust = None
                break
            rust = r1 if rust is None else {k: (min(v, r1[k]) if k in TIMED else v) for k, v in rust.items()}

    keys = (("frame_ms", "frame, cached ideal image"), ("frame_rerender_ms", "frame, re-rendered image"), ("probe_ms", "probe recomputation"))

    def ratio(key):
        if rust and isinstance(rust.get(key), (int, float)) and rust[key] > 0:
            return py[key] / rust[key]
        return None

    env = {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__, "threads": 1}
    if args.json:
        out = {"numpy": py, "rust": rust, "ratio": {k.removesuffix("_ms"): ratio(k) for k, _ in keys},
               "scenario": str(args.scenario), "note": note or None, "env": env}
        print(json.dumps(out))
        return

    print(f"STEM HAADF frame, {py['pixels'][0]}×{py['pixels'][1]} px at 0.2 Å, graphene+Si ({py['atoms']} atoms), "
          f"probe kernel {py['kernel_side']}² on a {py['padded'][0]}×{py['padded'][1]} padded grid; one thread")
    print(f"NumPy {env['numpy']} / SciPy {env['scipy']}, Python {env['python']}; medians of {py['frames']} "
          f"(probe: {min(py['frames'], 50)}), best of {max(args.repeats, 1)} alternating runs per side")
    print()
    print(f"{'':30}{'numpy ms':>10}{'rust ms':>10}{'numpy/rust':>12}")
    for key, label in keys:
        print(f"{label:30}{fmt(py[key])}{fmt(rust.get(key) if rust else None)}{fmt(ratio(key), 12)}")
    print()
    for name, st in (("cached frame", py["frame_stages_ms"]), ("re-rendered frame", py["rerender_stages_ms"])):
        print(f"NumPy {name} stages (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
    print(f"NumPy: {py['renders_in_cached_loop']} of the {py['frames']} cached-loop frames re-formed their ideal image (drift passed 0.1 pixel; "
          f"the Rust loop does the same). Counts: Generator.poisson on both frame kinds, as Rust runs poisson_fill.")
    if rust:
        print(f"Rust: `scopegym perf {Path(args.scenario).name} --frames {args.frames} --json`: {rust.get('atoms')} atoms")
        if rust.get("pixels") and list(rust["pixels"]) != py["pixels"]:
            print(f"warning: the Rust scenario's frame is {rust['pixels']}, not {py['pixels']}: the ratio compares different work")
        if rust.get("atoms") != py["atoms"]:
            print("warning: the Rust scenario is not the bench configuration (atom counts differ): its kernel and "
                  "padded grid may differ too, so the ratios compare somewhat different work")
    else:
        print(f"note: no Rust numbers: {note}")


if __name__ == "__main__":
    main()
