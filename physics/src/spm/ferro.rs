//! Ferroelectric film: out-of-plane polarization with time-dependent Ginzburg-Landau dynamics.
//!
//! The Landau-Khalatnikov / TDGL equation of DESIGN.md §5,
//! `dP/dt = -γ(αP + βP³ - k∇²P - E_loc)`, α < 0, β > 0, in reduced units (defaults α = -1.85,
//! β = 1.25, γ = 2). The state is stored as `p = P/P_s` with `P_s = sqrt(-α/β)` the spontaneous
//! polarization, so `p ∈ [-1, 1]` (a cell saturates at ±1); the equation becomes
//! `dp/dt = -γ(α(p - p³) - k∇²p - E_loc/P_s)`. The homogeneous coercive field is
//! `E_c = (2|α|/3) sqrt(|α|/(3β))` (0.866 for the defaults). The local field is the external
//! (tip) field plus a frozen random field, the imprint (built-in bias) and a depolarizing term
//! `-d·⟨p⟩`; pinning sites deepen the local double well. Explicit Euler on a periodic grid of
//! unit spacing.
//!
//! ```
//! use scopegym_physics::spm::ferro::{FerroConfig, FerroFilm, coercive_field};
//! assert!((coercive_field(-1.85, 1.25) - 0.866).abs() < 1e-3);
//! let mut film = FerroFilm::new(&FerroConfig::default(), [32, 32], 1).unwrap();
//! film.fill(-1.0);
//! film.relax(10, 0.0);
//! assert!(film.polarization().iter().all(|p| (-1.0..=1.0).contains(p)));
//! ```

use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::Unitless;
use crate::rng::{normal, seeded};
use ndarray::ArrayView2;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Periodic separable Gaussian smoothing of a `rows × cols` field (row-major) with standard
/// deviation `sigma` cells.
pub fn smooth_periodic(v: &[f64], shape: [usize; 2], sigma: f64) -> Vec<f64> {
    let [ny, nx] = shape;
    if sigma < 0.3 || v.len() != ny * nx {
        return v.to_vec();
    }
    let r = (3.0 * sigma).ceil() as i64;
    let w: Vec<f64> = (-r..=r)
        .map(|k| (-((k * k) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let norm: f64 = w.iter().sum();
    // The periodic tap indices of each axis, tabulated once; each sum runs over the taps in
    // the order of `w` (offset -r first).
    let tw = w.len();
    let taps = |n: usize| -> Vec<usize> {
        (0..n as i64)
            .flat_map(|i| (-r..=r).map(move |k| (i + k).rem_euclid(n as i64) as usize))
            .collect()
    };
    let cols = taps(nx);
    let mut tmp = vec![0.0; ny * nx];
    for i in 0..ny {
        let row = &v[i * nx..(i + 1) * nx];
        for (j, t) in tmp[i * nx..(i + 1) * nx].iter_mut().enumerate() {
            *t = cols[j * tw..(j + 1) * tw]
                .iter()
                .zip(&w)
                .map(|(&jj, wk)| wk * row[jj])
                .sum::<f64>()
                / norm;
        }
    }
    let rows = taps(ny);
    let mut out = vec![0.0; ny * nx];
    for i in 0..ny {
        let idx = &rows[i * tw..(i + 1) * tw];
        for (j, o) in out[i * nx..(i + 1) * nx].iter_mut().enumerate() {
            *o = idx
                .iter()
                .zip(&w)
                .map(|(&ii, wk)| wk * tmp[ii * nx + j])
                .sum::<f64>()
                / norm;
        }
    }
    out
}

/// Homogeneous coercive field of the Landau free energy `αP²/2 + βP⁴/4`:
/// `E_c = (2|α|/3) sqrt(|α|/(3β))` (reduced units).
pub fn coercive_field(alpha: f64, beta: f64) -> f64 {
    2.0 * alpha.abs() / 3.0 * (alpha.abs() / (3.0 * beta)).sqrt()
}

/// TDGL film settings (reduced units; `[ferroelectric]` in a scenario).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FerroConfig {
    /// Landau coefficient α (< 0). Default -1.85.
    pub alpha: Param<Unitless>,
    /// Landau coefficient β (> 0). Default 1.25.
    pub beta: Param<Unitless>,
    /// Kinetic coefficient γ (> 0). Default 2.
    pub gamma: Param<Unitless>,
    /// Gradient (domain-wall) coefficient k (≥ 0), per cell². Default 1.
    pub gradient: Param<Unitless>,
    /// Time step (reduced). Default 0.02 (stable for k ≤ 2).
    pub dt: Param<Unitless>,
    /// Standard deviation of the frozen random field (reduced field units). Default 0.1.
    pub random_field: Param<Unitless>,
    /// Correlation length of the frozen random field, cells: it is smoothed by a Gaussian of
    /// this standard deviation (and rescaled to keep `random_field` as its r.m.s.), so loop
    /// properties vary smoothly across the film. Default 0 (uncorrelated).
    pub random_field_correlation: Param<Unitless>,
    /// Fraction of cells that are pinning sites, 0..1. Default 0.05.
    pub pinning_fraction: Param<Unitless>,
    /// Factor (≥ 1) by which a pinning site deepens the double well. Default 1.5.
    pub pinning_strength: Param<Unitless>,
    /// Built-in bias field (imprint), reduced field units. Default 0.
    pub imprint: Param<Unitless>,
    /// Depolarization coefficient d ≥ 0 (field `-d·⟨p⟩`). Default 0.
    pub depolarization: Param<Unitless>,
}

impl Default for FerroConfig {
    fn default() -> Self {
        Self {
            alpha: Param::fixed(-1.85),
            beta: Param::fixed(1.25),
            gamma: Param::fixed(2.0),
            gradient: Param::fixed(1.0),
            dt: Param::fixed(0.02),
            random_field: Param::fixed(0.1),
            random_field_correlation: Param::fixed(0.0),
            pinning_fraction: Param::fixed(0.05),
            pinning_strength: Param::fixed(1.5),
            imprint: Param::fixed(0.0),
            depolarization: Param::fixed(0.0),
        }
    }
}

impl FerroConfig {
    /// Checks ranges and the explicit-Euler stability limit; `prefix` names the section.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let f = |n: &str, ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    what.to_string(),
                ))
            }
        };
        let (a, b, g, k, dt) = (
            self.alpha.get(),
            self.beta.get(),
            self.gamma.get(),
            self.gradient.get(),
            self.dt.get(),
        );
        f("alpha", a < 0.0 && a > -100.0, "must be in (-100, 0)")?;
        f("beta", b > 0.0 && b < 100.0, "must be in (0, 100)")?;
        f("gamma", g > 0.0 && g < 100.0, "must be in (0, 100)")?;
        f("gradient", (0.0..100.0).contains(&k), "must be in [0, 100)")?;
        f(
            "random_field",
            (0.0..10.0).contains(&self.random_field.get()),
            "must be in [0, 10)",
        )?;
        f(
            "random_field_correlation",
            (0.0..=256.0).contains(&self.random_field_correlation.get()),
            "must be in [0, 256] cells",
        )?;
        f(
            "pinning_fraction",
            (0.0..=1.0).contains(&self.pinning_fraction.get()),
            "must be in [0, 1]",
        )?;
        f(
            "pinning_strength",
            (1.0..100.0).contains(&self.pinning_strength.get()),
            "must be in [1, 100)",
        )?;
        f(
            "imprint",
            self.imprint.get().abs() < 10.0,
            "must be in (-10, 10)",
        )?;
        f(
            "depolarization",
            (0.0..10.0).contains(&self.depolarization.get()),
            "must be in [0, 10)",
        )?;
        let limit = self.stable_dt_limit();
        f(
            "dt",
            dt > 0.0 && dt < limit,
            &format!("must be in (0, {limit:.4}) for stable integration"),
        )
    }
}

impl FerroConfig {
    /// The explicit-Euler stability limit of the time step: `dt·γ·(2|α|·s + 8k) < 2` (s the
    /// pinning factor), i.e. `2 / (γ·(2|α|·s + 8k))`.
    pub fn stable_dt_limit(&self) -> f64 {
        2.0 / (self.gamma.get()
            * (2.0 * self.alpha.get().abs() * self.pinning_strength.get()
                + 8.0 * self.gradient.get()))
    }
}

/// The light integration of [`TipProtocol::light`]: a window fitted to the field's reach and
/// an early stop once the film has settled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LightTdgl {
    /// The window spans the disc where the tip field is at least this (reduced field units,
    /// [`tip_field_reach`]) ...
    pub reach_level: f64,
    /// ... plus this many cells (never more than [`TipProtocol::half`]).
    pub margin: f64,
    /// Integration under one field stops after the first step in which no cell of the window
    /// changed by this or more ([`FerroFilm::run_window_settling`]).
    pub tol: f32,
}

/// The constants of the light switching model of a bias pulse ([`FerroFilm::switch_pulse`]),
/// calibrated against the TDGL integration (test
/// `light_switching_writes_the_domains_of_the_tdgl`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LightSwitching {
    /// `c_n`, cells: the nucleation threshold under a tip of width `w` is
    /// `E_c·s^{3/2}·(1 + c_n/w)` (s the pinning factor): the gradient term resists a nucleus
    /// as narrow as the field (the form fitted to the TDGL).
    pub nucleation_gradient: f64,
    /// `t_0`, reduced time: a drive `D` above the threshold `E_n` nucleates after
    /// `t_0 / sqrt(D/E_n − 1)` (the saddle-node slowing of Landau-Khalatnikov switching).
    pub nucleation_time: f64,
    /// Factor on the Allen-Cahn curvature term `γk/r` of the wall velocity (1: the continuum
    /// value; the lattice resists it).
    pub curvature: f64,
    /// Field a wall needs before it moves (lattice pinning), reduced field units.
    pub depinning: f64,
    /// Factor on the closed-form wall mobility (1: the TDGL kink's).
    pub mobility: f64,
    /// Cells where the tip field is weaker than this (reduced field units) stay frozen.
    pub reach_level: f64,
    /// `σ`, cells: the line tension of the walls, applied once after the front stops as one
    /// area-conserving threshold-dynamics step ([`FerroFilm::switch_pulse`]) with a Gaussian of
    /// this standard deviation (0: none).
    pub wall_smoothing: f64,
}

/// How a tip writes and probes a [`FerroFilm`]: the Lorentzian field profile of a biased tip
/// in film units and how the TDGL equation is integrated under it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TipProtocol {
    /// Lorentzian half width of the tip field, cells.
    pub width: f64,
    /// Half size of the integration window around the tip, cells (the whole film when the
    /// window does not fit in it).
    pub half: usize,
    /// Reduced field at the apex per volt of bias, 1/V.
    pub field_per_volt: f64,
    /// Added to the applied bias, V (contact potential, imprint).
    pub bias_offset: f64,
    /// `None`: integrate every step in the full window; `Some`: the light integration.
    pub light: Option<LightTdgl>,
    /// `Some`: bias pulses ([`FerroFilm::tip_pulse`]) run the light switching model
    /// ([`FerroFilm::switch_pulse`]) instead of the TDGL integration.
    pub switching: Option<LightSwitching>,
}

impl TipProtocol {
    /// The window half size for an apex field of at most `amplitude` (reduced units).
    fn window(&self, amplitude: f64) -> usize {
        match self.light {
            None => self.half,
            Some(l) => {
                let reach = tip_field_reach(amplitude, self.width, l.reach_level) + l.margin;
                (reach.ceil() as usize).min(self.half)
            }
        }
    }

    /// Sets the tip field of apex field `amplitude` at `(x, y)`: everywhere, or in the light
    /// integration inside the window `half` only.
    fn set_field(&self, film: &mut FerroFilm, x: f64, y: f64, amplitude: f64, half: usize) {
        match self.light {
            None => film.set_tip_field(x, y, amplitude, self.width),
            Some(_) => film.set_tip_field_window(x, y, amplitude, self.width, half),
        }
    }

    fn run(&self, film: &mut FerroFilm, steps: usize, x: f64, y: f64, half: usize) {
        match self.light {
            None => film.run_window(steps, x, y, half),
            Some(l) => {
                film.run_window_settling(steps, x, y, half, l.tol);
            }
        }
    }
}

/// A ferroelectric film: reduced polarization `p ∈ [-1, 1]` on an `ny × nx` periodic grid.
#[derive(Debug, Clone)]
pub struct FerroFilm {
    shape: [usize; 2],
    p: Vec<f32>,
    next: Vec<f32>,
    /// Frozen local field: random field plus imprint, divided by P_s.
    bias: Vec<f32>,
    /// Per-cell α multiplier (1, or the pinning strength).
    well: Vec<f32>,
    /// External field buffer (reduced units, divided by P_s when used).
    field: Vec<f32>,
    /// Squared column distances of [`FerroFilm::set_tip_field`] (scratch).
    dx2: Vec<f64>,
    /// The window of [`FerroFilm::run_window`]: its polarization with a one-cell halo, twice,
    /// then its field, bias and well (scratch).
    window: Vec<f32>,
    /// Arrival times of [`FerroFilm::switch_pulse`] (scratch, infinite between calls).
    arrival: Vec<f32>,
    /// The front of [`FerroFilm::switch_pulse`]: (arrival time bits, cell), earliest first.
    front: std::collections::BinaryHeap<std::cmp::Reverse<(u32, u32)>>,
    /// Cells [`FerroFilm::switch_pulse`] touched, with their polarization before (scratch).
    touched: Vec<(u32, f32)>,
    alpha: f32,
    gamma: f32,
    gradient: f32,
    dt: f32,
    depol: f32,
    ps: f32,
    /// Elapsed reduced time.
    pub time: f64,
}

impl FerroFilm {
    /// A film of `shape = [rows, cols]` cells, polarization 0, disorder drawn from `seed`.
    pub fn new(cfg: &FerroConfig, shape: [usize; 2], seed: u64) -> Result<Self> {
        cfg.validate("ferroelectric.")?;
        let [ny, nx] = shape;
        if !(4..=4096).contains(&ny) || !(4..=4096).contains(&nx) {
            return Err(PhysicsError::arg(
                "shape",
                format!("each side must be 4..=4096, got {shape:?}"),
            ));
        }
        let n = ny * nx;
        let mut rng = seeded(seed);
        let (alpha, beta) = (cfg.alpha.get(), cfg.beta.get());
        let ps = (-alpha / beta).sqrt();
        let sd = cfg.random_field.get();
        let imprint = cfg.imprint.get();
        let mut noise: Vec<f64> = (0..n).map(|_| normal(&mut rng)).collect();
        let corr = cfg.random_field_correlation.get();
        if corr >= 0.3 {
            noise = smooth_periodic(&noise, [ny, nx], corr);
            let rms = (noise.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
            if rms > 0.0 {
                noise.iter_mut().for_each(|v| *v /= rms);
            }
        }
        let bias = noise
            .iter()
            .map(|z| ((imprint + sd * z) / ps) as f32)
            .collect();
        let frac = cfg.pinning_fraction.get();
        let strength = cfg.pinning_strength.get() as f32;
        let well = (0..n)
            .map(|_| {
                if rng.random::<f64>() < frac {
                    strength
                } else {
                    1.0
                }
            })
            .collect();
        Ok(Self {
            shape,
            p: vec![0.0; n],
            next: vec![0.0; n],
            bias,
            well,
            field: vec![0.0; n],
            dx2: Vec::with_capacity(nx),
            window: Vec::new(),
            arrival: vec![f32::INFINITY; n],
            front: std::collections::BinaryHeap::new(),
            touched: Vec::new(),
            alpha: alpha as f32,
            gamma: cfg.gamma.get() as f32,
            gradient: cfg.gradient.get() as f32,
            dt: cfg.dt.get() as f32,
            depol: cfg.depolarization.get() as f32,
            ps: ps as f32,
            time: 0.0,
        })
    }

    /// The time step of the explicit scheme (reduced units).
    pub fn time_step(&self) -> f64 {
        f64::from(self.dt)
    }

    /// Sets the time step (reduced units). Explicit Euler is stable below
    /// [`FerroConfig::stable_dt_limit`] of the film's config: the caller keeps it there.
    pub fn set_time_step(&mut self, dt: f64) -> Result<()> {
        if !(dt.is_finite() && dt > 0.0) {
            return Err(PhysicsError::arg(
                "dt",
                format!("must be finite and > 0, got {dt}"),
            ));
        }
        self.dt = dt as f32;
        Ok(())
    }

    /// A bias pulse of `bias` V at `(x, y)` (cells) under `tip`: the tip field for `steps` time
    /// steps, then `relax` steps at zero field so that unstable nuclei shrink back.
    pub fn tip_pulse(
        &mut self,
        x: f64,
        y: f64,
        bias: f64,
        steps: usize,
        relax: usize,
        tip: &TipProtocol,
    ) {
        let a = (bias + tip.bias_offset) * tip.field_per_volt;
        if let Some(m) = tip.switching {
            let dt = f64::from(self.dt);
            self.switch_pulse(x, y, a, tip.width, steps as f64 * dt, relax, &m);
            return;
        }
        let half = tip.window(a);
        tip.set_field(self, x, y, a, half);
        tip.run(self, steps, x, y, half);
        self.set_uniform_field(0.0);
        tip.run(self, relax, x, y, half);
    }

    /// Switching spectroscopy at `(x, y)` (cells) under `tip`: for each bias of `waveform`
    /// (V), the tip field for `steps` time steps, then [`Self::local_response`] within the
    /// tip's width. One response per waveform point. The external field is left on.
    pub fn tip_spectroscopy(
        &mut self,
        x: f64,
        y: f64,
        waveform: &[f64],
        steps: usize,
        tip: &TipProtocol,
    ) -> Vec<f64> {
        let peak = waveform.iter().fold(0.0f64, |m, &v| {
            m.max(((v + tip.bias_offset) * tip.field_per_volt).abs())
        });
        let half = tip.window(peak);
        waveform
            .iter()
            .map(|&v| {
                let a = (v + tip.bias_offset) * tip.field_per_volt;
                tip.set_field(self, x, y, a, half);
                tip.run(self, steps, x, y, half);
                self.local_response(x, y, tip.width)
            })
            .collect()
    }

    /// The light switching model of a bias pulse: apex field `amplitude` (reduced, signed) of
    /// a Lorentzian tip of `width` cells at `(x, y)` for `duration` (reduced time), then
    /// `relax` TDGL steps at zero field. The sharp-wall (nucleation-and-growth) limit of the TDGL film:
    ///
    /// - **Nucleation**: a cell against the field switches by itself when the drive `D` (the
    ///   tip field plus the random field and imprint averaged over the cell and its four
    ///   neighbours, and the depolarizing field, along the pulse) exceeds
    ///   `E_n = E_c·s^{3/2}·(1 + c_n/w)` (E_c the homogeneous coercive field, s the mean
    ///   pinning factor of the five cells), after `t_n = t_0/sqrt(D/E_n − 1)`
    ///   ([`LightSwitching`]).
    /// - **Growth**: walls move at the velocity of the planar TDGL front less the
    ///   Allen-Cahn curvature term, `v = μ·γ·sqrt(|α|s·k/2)·K(ε) − γk/r`: with
    ///   `ε = (E_loc − E_p)/(P_s·|α|s)` the reduced drive ([`kink_asymmetry`] `K`, ≈ 3ε, the
    ///   exact front speed of `dp/dt = -γ(αs(p − p³) − k∇²p − E/P_s)`; μ = 1 is that closed
    ///   form), `E_loc` the tip field plus the cell's frozen field, `E_p` the lattice
    ///   depinning field, `s` the cell's pinning factor and `r` the distance from the tip (a
    ///   domain's radius, at least 1). The
    ///   wall spreads from the nucleus and from walls of domains already along the field,
    ///   over the 8-connected grid (Dijkstra arrival times); cells reached within `duration`
    ///   switch (to ±1). Only cells where the tip field is at least `reach_level` move.
    /// - **Line tension**: the switched cells then take the shape of one step of
    ///   area-conserving threshold dynamics (the MBO scheme of Merriman, Bence & Osher 1994,
    ///   which moves a wall by its curvature, as the Allen-Cahn limit `v = γk·κ` of the TDGL
    ///   does; with the area kept as in Ruuth & Wetton 2003): the indicator of the cells along
    ///   the field, in a window two cells beyond those the front reached, is blurred with a
    ///   Gaussian of `wall_smoothing` cells, and as many cells as were along the field before
    ///   end up along it, those of the largest blurred values. This removes the cell-scale
    ///   roughness of the front on the disordered grid (which the TDGL's gradient term smooths
    ///   while the wall moves) and leaves the written area unchanged.
    /// - **Relaxation**: `relax` explicit TDGL steps at zero field in a window around the
    ///   cells the front reached, as after the TDGL pulse (walls take their profile, rough
    ///   edges and small nuclei shrink).
    ///
    /// Deterministic: no random draws. The film's time advances by `duration` and the
    /// relaxation's steps.
    #[allow(clippy::too_many_arguments)]
    pub fn switch_pulse(
        &mut self,
        x: f64,
        y: f64,
        amplitude: f64,
        width: f64,
        duration: f64,
        relax: usize,
        m: &LightSwitching,
    ) {
        use std::cmp::Reverse;
        self.time += duration;
        if amplitude == 0.0 || !amplitude.is_finite() || duration <= 0.0 {
            return;
        }
        let [ny, nx] = self.shape;
        let s = amplitude.signum();
        let sf = s as f32;
        let amp = amplitude.abs();
        let (alpha, gamma, k) = (
            f64::from(self.alpha).abs(),
            f64::from(self.gamma),
            f64::from(self.gradient),
        );
        let ps = f64::from(self.ps);
        let e_c = 2.0 * alpha / 3.0 * ps / 3f64.sqrt();
        let depol = if self.depol == 0.0 {
            0.0
        } else {
            -f64::from(self.depol) * self.p.iter().map(|&v| f64::from(v)).sum::<f64>()
                / self.p.len() as f64
        };
        let w2 = width * width;
        let curv = m.curvature * gamma * k;
        // Tip field and wall velocity at a cell (None: frozen, or the wall cannot enter).
        let (bias, well) = (&self.bias, &self.well);
        let speed = |i: usize, j: usize| -> Option<f64> {
            let (dy, dx) = (min_image(i as f64 - y, ny), min_image(j as f64 - x, nx));
            let r2 = dx * dx + dy * dy;
            let e_tip = amp / (1.0 + r2 / w2);
            if e_tip < m.reach_level {
                return None;
            }
            let c = i * nx + j;
            let drive = e_tip + s * (ps * f64::from(bias[c]) + depol) - m.depinning;
            if drive <= 0.0 {
                return None;
            }
            let a_c = alpha * f64::from(well[c]);
            let v =
                m.mobility * (0.5 * a_c * k).sqrt() * gamma * kink_asymmetry(drive / (ps * a_c))
                    - curv / r2.sqrt().max(1.0);
            (v > 0.0).then_some(v)
        };
        // The window: every cell within the reach (at most once on the periodic film).
        let reach = tip_field_reach(amp, width, m.reach_level).ceil() as i64;
        let (hy, hx) = (
            reach.min((ny as i64 - 1) / 2),
            reach.min((nx as i64 - 1) / 2),
        );
        let (ci, cj) = (y.round() as i64, x.round() as i64);
        let along = |v: f32| v * sf > 0.0;
        self.touched.clear();
        // Walls of domains already along the field start at time 0.
        for di in -hy..=hy {
            let i = wrap_index(ci + di, ny);
            let (up, dn) = (wrap_index(ci + di - 1, ny), wrap_index(ci + di + 1, ny));
            for dj in -hx..=hx {
                let j = wrap_index(cj + dj, nx);
                if !along(self.p[i * nx + j]) {
                    continue;
                }
                let (l, r) = (wrap_index(cj + dj - 1, nx), wrap_index(cj + dj + 1, nx));
                let against = [up, i, dn]
                    .iter()
                    .any(|&ii| [l, j, r].iter().any(|&jj| !along(self.p[ii * nx + jj])));
                if against {
                    let c = i * nx + j;
                    self.arrival[c] = 0.0;
                    self.touched.push((c as u32, self.p[c]));
                    self.front.push(Reverse((0, c as u32)));
                }
            }
        }
        // Nucleation: every cell against the field whose drive beats its threshold switches
        // by itself after its incubation time (the random field and the well depth averaged
        // over the cell and its four neighbours, the smallest nucleus).
        let e_n0 = e_c * (1.0 + m.nucleation_gradient / width);
        let hn = tip_field_reach(amp, width, 0.5 * e_n0).ceil() as i64;
        let (ny_h, nx_h) = (hn.min((ny as i64 - 1) / 2), hn.min((nx as i64 - 1) / 2));
        for di in -ny_h..=ny_h {
            let i = wrap_index(ci + di, ny);
            let (up, dn) = (wrap_index(ci + di - 1, ny), wrap_index(ci + di + 1, ny));
            let dy = min_image(i as f64 - y, ny);
            for dj in -nx_h..=nx_h {
                let j = wrap_index(cj + dj, nx);
                let c = i * nx + j;
                if along(self.p[c]) {
                    continue;
                }
                let dx = min_image(j as f64 - x, nx);
                let e_tip = amp / (1.0 + (dx * dx + dy * dy) / w2);
                if e_tip < 0.5 * e_n0 {
                    continue;
                }
                let (l, r) = (
                    i * nx + wrap_index(cj + dj - 1, nx),
                    i * nx + wrap_index(cj + dj + 1, nx),
                );
                let five = [c, l, r, up * nx + j, dn * nx + j];
                let h = five.iter().map(|&q| f64::from(self.bias[q])).sum::<f64>() / 5.0;
                let sw = five.iter().map(|&q| f64::from(self.well[q])).sum::<f64>() / 5.0;
                let drive = e_tip + s * (ps * h + depol);
                let e_n = e_n0 * sw.powf(1.5);
                if drive > e_n {
                    let t = (m.nucleation_time / (drive / e_n - 1.0).sqrt()) as f32;
                    if f64::from(t) <= duration && t < self.arrival[c] {
                        if self.arrival[c].is_infinite() {
                            self.touched.push((c as u32, self.p[c]));
                        }
                        self.arrival[c] = t;
                        self.front.push(Reverse((t.to_bits(), c as u32)));
                    }
                }
            }
        }
        while let Some(Reverse((tb, c))) = self.front.pop() {
            let t = f32::from_bits(tb);
            let c = c as usize;
            if t > self.arrival[c] {
                continue;
            }
            if f64::from(t) > duration {
                break;
            }
            if !along(self.p[c]) {
                self.p[c] = sf;
            }
            let (i, j) = (c / nx, c % nx);
            for &(di, dj) in &STENCIL {
                let (ii, jj) = (wrap_index(i as i64 + di, ny), wrap_index(j as i64 + dj, nx));
                let nb = ii * nx + jj;
                if along(self.p[nb]) {
                    continue;
                }
                let Some(v) = speed(ii, jj) else { continue };
                let d = ((di * di + dj * dj) as f64).sqrt();
                let tn = (f64::from(t) + d / v) as f32;
                if tn < self.arrival[nb] && f64::from(tn) <= duration {
                    if self.arrival[nb].is_infinite() {
                        self.touched.push((nb as u32, self.p[nb]));
                    }
                    self.arrival[nb] = tn;
                    self.front.push(Reverse((tn.to_bits(), nb as u32)));
                }
            }
        }
        self.front.clear();
        // How far from the tip the front reached (cells), for the two stages below.
        let mut reach = 0usize;
        for &(c, _) in &self.touched {
            let c = c as usize;
            self.arrival[c] = f32::INFINITY;
            let (dy, dx) = (
                min_image((c / nx) as f64 - y.round(), ny),
                min_image((c % nx) as f64 - x.round(), nx),
            );
            reach = reach.max(dy.max(dx) as usize);
        }
        // Line tension: one area-conserving threshold-dynamics step over the cells the front
        // reached (the Dijkstra front on a disordered grid leaves walls rougher than the
        // TDGL's, whose gradient term smooths them while they move).
        if m.wall_smoothing > 0.0 && !self.touched.is_empty() {
            self.smooth_walls(ci, cj, reach + 2, sf, m.wall_smoothing);
        }
        // The zero-field relaxation: `relax` TDGL steps in a window around every cell the
        // front touched (walls take their profile, rough edges and small nuclei shrink).
        if relax > 0 && !self.touched.is_empty() {
            self.set_uniform_field(0.0);
            self.run_window(relax, x.round(), y.round(), reach + 2);
        }
        self.touched.clear();
    }

    /// One area-conserving threshold-dynamics step on the sign of the polarization in the
    /// window of half size `half` around the cell `(ci, cj)`: the indicator of the cells along
    /// `sf` is blurred with a Gaussian of `sigma` cells (periodic), and the same number of
    /// cells as before, those of the largest blurred values, end up along `sf`. Cells whose
    /// sign changes are set to `±1`; the others keep their value.
    fn smooth_walls(&mut self, ci: i64, cj: i64, half: usize, sf: f32, sigma: f64) {
        let [ny, nx] = self.shape;
        let r = (3.0 * sigma).ceil() as i64;
        let (hy, hx) = (
            (half as i64).min((ny as i64 - 1) / 2),
            (half as i64).min((nx as i64 - 1) / 2),
        );
        let kernel: Vec<f32> = {
            let k: Vec<f64> = (-r..=r)
                .map(|d| (-0.5 * (d * d) as f64 / (sigma * sigma)).exp())
                .collect();
            let sum: f64 = k.iter().sum();
            k.iter().map(|v| (v / sum) as f32).collect()
        };
        // The indicator on the window plus a margin of r, then blurred along rows, then columns.
        let (wy, wx) = ((2 * hy + 1) as usize, (2 * hx + 1) as usize);
        let ex = wx + 2 * r as usize;
        let ey = wy + 2 * r as usize;
        let mut ind = vec![0f32; ey * ex];
        for a in 0..ey {
            let i = wrap_index(ci - hy - r + a as i64, ny);
            for b in 0..ex {
                let j = wrap_index(cj - hx - r + b as i64, nx);
                ind[a * ex + b] = if self.p[i * nx + j] * sf > 0.0 {
                    1.0
                } else {
                    0.0
                };
            }
        }
        let mut rows = vec![0f32; ey * wx];
        for a in 0..ey {
            for b in 0..wx {
                rows[a * wx + b] = kernel
                    .iter()
                    .enumerate()
                    .map(|(t, &w)| w * ind[a * ex + b + t])
                    .sum();
            }
        }
        let mut cells: Vec<(f32, u32)> = Vec::with_capacity(wy * wx);
        let mut area = 0usize;
        for a in 0..wy {
            let i = wrap_index(ci - hy + a as i64, ny);
            for b in 0..wx {
                let j = wrap_index(cj - hx + b as i64, nx);
                let u: f32 = kernel
                    .iter()
                    .enumerate()
                    .map(|(t, &w)| w * rows[(a + t) * wx + b])
                    .sum();
                let c = i * nx + j;
                area += usize::from(self.p[c] * sf > 0.0);
                cells.push((u, c as u32));
            }
        }
        largest_first(&mut cells, area);
        for (k, &(_, c)) in cells.iter().enumerate() {
            let c = c as usize;
            let along = self.p[c] * sf > 0.0;
            if k < area && !along {
                self.p[c] = sf;
            } else if k >= area && along {
                self.p[c] = -sf;
            }
        }
    }

    /// Sets every cell to `p` (clamped to [-1, 1]).
    pub fn fill(&mut self, p: f32) {
        self.p.iter_mut().for_each(|v| *v = p.clamp(-1.0, 1.0));
    }

    /// The polarization `p = P/P_s`, `rows × cols`.
    pub fn polarization(&self) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape(self.shape, &self.p).expect("sized at construction")
    }

    /// Mutable polarization values (row-major).
    pub fn polarization_mut(&mut self) -> &mut [f32] {
        &mut self.p
    }

    /// Sets the external field to a Lorentzian tip profile `E(r) = amplitude / (1 + r²/width²)`
    /// centred at `(x, y)` (cells), reduced field units.
    pub fn set_tip_field(&mut self, x: f64, y: f64, amplitude: f64, width: f64) {
        let [ny, nx] = self.shape;
        let w2 = width * width;
        // Periodic minimum-image distances: x² per column once, y² per row.
        self.dx2.clear();
        self.dx2.extend((0..nx).map(|j| {
            let dx = min_image(j as f64 - x, nx);
            dx * dx
        }));
        for (i, row) in self.field.chunks_exact_mut(nx).enumerate() {
            let dy = min_image(i as f64 - y, ny);
            let dy2 = dy * dy;
            for (f, &dx2) in row.iter_mut().zip(&self.dx2) {
                *f = (amplitude / (1.0 + (dx2 + dy2) / w2)) as f32;
            }
        }
    }

    /// [`Self::set_tip_field`] inside the window of [`Self::run_window`] (half size `half`
    /// cells around `(x, y)`) only, with the same values there; the field elsewhere is left as
    /// it was (the windowed run does not read it).
    pub fn set_tip_field_window(
        &mut self,
        x: f64,
        y: f64,
        amplitude: f64,
        width: f64,
        half: usize,
    ) {
        let [ny, nx] = self.shape;
        if 2 * half + 1 >= ny.min(nx) {
            self.set_tip_field(x, y, amplitude, width);
            return;
        }
        let w2 = width * width;
        let (ci, cj, h) = (y.round() as i64, x.round() as i64, half as i64);
        self.dx2.clear();
        self.dx2.extend((-h..=h).map(|d| {
            let j = wrap_index(cj + d, nx) as f64;
            let dx = min_image(j - x, nx);
            dx * dx
        }));
        // The window's columns as at most two contiguous runs of the film's row.
        let runs = column_runs(cj - h, 2 * half + 1, nx);
        for di in -h..=h {
            let i = wrap_index(ci + di, ny);
            let dy = min_image(i as f64 - y, ny);
            let dy2 = dy * dy;
            let row = &mut self.field[i * nx..(i + 1) * nx];
            for &(o, j, len) in &runs {
                for (f, &dx2) in row[j..j + len].iter_mut().zip(&self.dx2[o..o + len]) {
                    *f = (amplitude / (1.0 + (dx2 + dy2) / w2)) as f32;
                }
            }
        }
    }

    /// Sets a uniform external field (reduced units).
    pub fn set_uniform_field(&mut self, e: f64) {
        self.field.iter_mut().for_each(|v| *v = e as f32);
    }

    /// Advances `steps` time steps under the current external field.
    pub fn run(&mut self, steps: usize) {
        self.run_steps(steps, None);
    }

    /// [`Self::run`] that stops once the film has settled: after the first step in which no
    /// cell changed by `tol` or more (a fixed point of the explicit scheme is one of the TDGL
    /// equation, whatever the time step). Returns the steps run.
    pub fn run_settling(&mut self, steps: usize, tol: f32) -> usize {
        self.run_steps(steps, Some(tol))
    }

    fn run_steps(&mut self, steps: usize, tol: Option<f32>) -> usize {
        let [ny, nx] = self.shape;
        let (a, g, k, dt) = (self.alpha, self.gamma, self.gradient, self.dt);
        let inv_ps = 1.0 / self.ps;
        for step in 0..steps {
            // The depolarizing field needs ⟨p⟩: a pass over the film only when it is on.
            let depol = if self.depol == 0.0 {
                0.0
            } else {
                -self.depol * self.p.iter().sum::<f32>() / self.p.len() as f32 * inv_ps
            };
            let c = TdglConsts {
                a,
                g,
                k,
                dt,
                inv_ps,
                depol,
            };
            let mut next = std::mem::take(&mut self.next);
            for i in 0..ny {
                self.step_cells(i, 0, nx, &mut next[i * nx..(i + 1) * nx], c);
            }
            self.next = next;
            std::mem::swap(&mut self.p, &mut self.next);
            self.time += f64::from(dt);
            if let Some(tol) = tol {
                let change = max_change(&self.p, &self.next);
                if change < tol {
                    return step + 1;
                }
            }
        }
        steps
    }

    /// Advances `steps` time steps inside a window of half-size `half` cells around `(x, y)`
    /// (cells) only; cells outside stay frozen and act as the window's boundary. A local tip
    /// field leaves the far film in equilibrium, so this gives the same answer as [`Self::run`]
    /// for a window that contains the region the field reaches, at a fraction of the cost.
    /// The depolarizing field uses ⟨p⟩ at the start of the call.
    pub fn run_window(&mut self, steps: usize, x: f64, y: f64, half: usize) {
        self.window_steps(steps, x, y, half, None);
    }

    /// [`Self::run_window`] that stops once the window has settled (as [`Self::run_settling`]:
    /// no cell of the window changed by `tol` or more in the last step). Returns the steps run.
    pub fn run_window_settling(
        &mut self,
        steps: usize,
        x: f64,
        y: f64,
        half: usize,
        tol: f32,
    ) -> usize {
        self.window_steps(steps, x, y, half, Some(tol))
    }

    fn window_steps(
        &mut self,
        steps: usize,
        x: f64,
        y: f64,
        half: usize,
        tol: Option<f32>,
    ) -> usize {
        let [ny, nx] = self.shape;
        if 2 * half + 1 >= ny.min(nx) {
            return self.run_steps(steps, tol);
        }
        let (a, g, k, dt) = (self.alpha, self.gamma, self.gradient, self.dt);
        let inv_ps = 1.0 / self.ps;
        let depol = if self.depol == 0.0 {
            0.0
        } else {
            -self.depol * self.p.iter().sum::<f32>() / self.p.len() as f32 * inv_ps
        };
        let (ci, cj) = (y.round() as i64, x.round() as i64);
        let w = 2 * half + 1;
        let h = half as i64;
        let c = TdglConsts {
            a,
            g,
            k,
            dt,
            inv_ps,
            depol,
        };
        // The window's polarization runs in a local copy with a one-cell halo of the frozen
        // neighbours around it (`wp × wp`, row-major), and its field, bias and well in local
        // `w × w` copies, so that a step is one vectorized pass over the window. Columns of
        // the film map onto the local ones as at most two contiguous runs `(local column,
        // film column, length)` (the window may wrap across the film's edge).
        let wp = w + 2;
        let (halo_runs, inner_runs) = (column_runs(cj - h - 1, wp, nx), column_runs(cj - h, w, nx));
        let mut buf = std::mem::take(&mut self.window);
        let need = 2 * wp * wp + 3 * w * w;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        // (Every value used is written below.)
        let (mut cur, rest) = buf[..need].split_at_mut(wp * wp);
        let (mut next, rest) = rest.split_at_mut(wp * wp);
        let (field, rest) = rest.split_at_mut(w * w);
        let (bias, well) = rest.split_at_mut(w * w);
        for a in 0..wp {
            let i = wrap_index(ci - h - 1 + a as i64, ny);
            for &(o, j, len) in &halo_runs {
                cur[a * wp + o..a * wp + o + len]
                    .copy_from_slice(&self.p[i * nx + j..i * nx + j + len]);
            }
            if (1..=w).contains(&a) {
                let q = (a - 1) * w;
                for &(o, j, len) in &inner_runs {
                    let (l, f) = (q + o..q + o + len, i * nx + j..i * nx + j + len);
                    field[l.clone()].copy_from_slice(&self.field[f.clone()]);
                    bias[l.clone()].copy_from_slice(&self.bias[f.clone()]);
                    well[l].copy_from_slice(&self.well[f]);
                }
            }
        }
        next.copy_from_slice(cur);
        let mut ran = steps;
        for step in 0..steps {
            tdgl_window(cur, next, field, bias, well, w, c);
            // (The halo is the same in both, so it adds nothing to the largest change.)
            let change = if tol.is_some() {
                max_change(cur, next)
            } else {
                0.0
            };
            std::mem::swap(&mut cur, &mut next);
            self.time += f64::from(dt);
            if tol.is_some_and(|t| change < t) {
                ran = step + 1;
                break;
            }
        }
        for a in 1..=w {
            let i = wrap_index(ci - h - 1 + a as i64, ny);
            for &(o, j, len) in &inner_runs {
                let r = a * wp + 1 + o;
                self.p[i * nx + j..i * nx + j + len].copy_from_slice(&cur[r..r + len]);
            }
        }
        self.window = buf;
        ran
    }

    /// One explicit step of cells `j_from..j_to` of row `i` (periodic neighbours) into `out`:
    /// the interior as one contiguous run, the film's first and last column one by one.
    fn step_cells(&self, i: usize, j_from: usize, j_to: usize, out: &mut [f32], c: TdglConsts) {
        let [ny, nx] = self.shape;
        let up = if i == 0 { ny - 1 } else { i - 1 };
        let down = if i + 1 == ny { 0 } else { i + 1 };
        let (row, rup, rdn) = (
            &self.p[i * nx..(i + 1) * nx],
            &self.p[up * nx..(up + 1) * nx],
            &self.p[down * nx..(down + 1) * nx],
        );
        let (bias, well, field) = (
            &self.bias[i * nx..(i + 1) * nx],
            &self.well[i * nx..(i + 1) * nx],
            &self.field[i * nx..(i + 1) * nx],
        );
        let one = |j: usize, out: &mut [f32]| {
            let left = row[if j == 0 { nx - 1 } else { j - 1 }];
            let right = row[if j + 1 == nx { 0 } else { j + 1 }];
            let r = j..j + 1;
            tdgl_row(
                &row[r.clone()],
                &[left],
                &[right],
                &rup[r.clone()],
                &rdn[r.clone()],
                &field[r.clone()],
                &bias[r.clone()],
                &well[r],
                out,
                c,
            );
        };
        let (lo, hi) = (j_from.max(1), j_to.min(nx - 1));
        if j_from == 0 {
            one(0, &mut out[..1]);
        }
        if lo < hi {
            let r = lo..hi;
            tdgl_row(
                &row[r.clone()],
                &row[lo - 1..hi - 1],
                &row[lo + 1..hi + 1],
                &rup[r.clone()],
                &rdn[r.clone()],
                &field[r.clone()],
                &bias[r.clone()],
                &well[r],
                &mut out[lo - j_from..hi - j_from],
                c,
            );
        }
        if j_to == nx && nx > 1 {
            one(nx - 1, &mut out[nx - 1 - j_from..nx - j_from]);
        }
    }

    /// Runs `steps` steps under a uniform field `e`.
    pub fn relax(&mut self, steps: usize, e: f64) {
        self.set_uniform_field(e);
        self.run(steps);
    }

    /// Mean polarization within `radius` cells of `(x, y)`: the local piezoresponse under a tip
    /// (arbitrary units, sign = polarization direction).
    pub fn local_response(&self, x: f64, y: f64, radius: f64) -> f64 {
        let [ny, nx] = self.shape;
        let (mut sum, mut n) = (0.0, 0usize);
        let r = radius.max(0.5);
        let (i0, i1) = ((y - r).floor() as i64, (y + r).ceil() as i64);
        let (j0, j1) = ((x - r).floor() as i64, (x + r).ceil() as i64);
        for i in i0..=i1 {
            for j in j0..=j1 {
                if ((i as f64 - y).powi(2) + (j as f64 - x).powi(2)) <= r * r {
                    let (ii, jj) = (
                        i.rem_euclid(ny as i64) as usize,
                        j.rem_euclid(nx as i64) as usize,
                    );
                    sum += f64::from(self.p[ii * nx + jj]);
                    n += 1;
                }
            }
        }
        if n == 0 { 0.0 } else { sum / n as f64 }
    }

    /// Switching spectroscopy at `(x, y)` (cells): for each value of the tip bias `waveform`
    /// (reduced field at the tip apex), applies the Lorentzian tip field of `width` cells for
    /// `steps_per_point` steps and records [`Self::local_response`] within `width`. Returns one
    /// response per waveform point: a hysteresis loop when the waveform sweeps up and down.
    pub fn switching_spectroscopy(
        &mut self,
        x: f64,
        y: f64,
        waveform: &[f64],
        width: f64,
        steps_per_point: usize,
    ) -> Vec<f64> {
        waveform
            .iter()
            .map(|&v| {
                self.set_tip_field(x, y, v, width);
                self.run(steps_per_point);
                self.local_response(x, y, width)
            })
            .collect()
    }

    /// Fraction of cells with `p > 0`.
    pub fn up_fraction(&self) -> f64 {
        self.p.iter().filter(|&&v| v > 0.0).count() as f64 / self.p.len() as f64
    }
}

/// The local piezoresponse of a film, `R = p ⊛ g`, with `g` the tip transfer function: a
/// normalized Gaussian of standard deviation `tip_sigma` cells (periodic boundaries). `R` has
/// the sign of the polarization under the tip and shrinks at domain walls.
pub fn pfm_response(film: &FerroFilm, tip_sigma: f64) -> ndarray::Array2<f64> {
    let p = film.polarization();
    let (ny, nx) = p.dim();
    let r = (3.0 * tip_sigma).ceil().max(0.0) as i64;
    let w: Vec<f64> = (-r..=r)
        .map(|k| (-(k * k) as f64 / (2.0 * tip_sigma.max(1e-6).powi(2))).exp())
        .collect();
    let norm: f64 = w.iter().sum();
    // Each pass sums its taps in the order of `w` (offset -r first) for every output value,
    // so the result does not depend on how the periodic indices are found; the passes run tap
    // by tap over whole rows, so the inner loops vectorize.
    let tw = w.len() as i64;
    let src: Vec<f64> = p.iter().map(|&v| f64::from(v)).collect();
    // Along the rows (axis 0): row i gathers rows (i + t − r) mod ny ...
    let mut mid = vec![0.0f64; ny * nx];
    for (i, out) in mid.chunks_exact_mut(nx.max(1)).enumerate() {
        for (t, &wk) in w.iter().enumerate() {
            let ii = wrap_index(i as i64 + t as i64 - r, ny);
            for (o, &v) in out.iter_mut().zip(&src[ii * nx..(ii + 1) * nx]) {
                *o += wk * v;
            }
        }
        out.iter_mut().for_each(|o| *o /= norm);
    }
    // ... then along the columns (axis 1), over each row extended periodically by r on both
    // sides: column j's tap t is the extended row's value j + t.
    let ext_idx: Vec<usize> = (0..nx as i64 + tw - 1)
        .map(|q| wrap_index(q - r, nx))
        .collect();
    let mut ext = vec![0.0f64; ext_idx.len()];
    let mut acc = vec![0.0f64; nx];
    let mut out = ndarray::Array2::<f64>::zeros((ny, nx));
    for (i, mut orow) in out.rows_mut().into_iter().enumerate() {
        let row = &mid[i * nx..(i + 1) * nx];
        for (e, &q) in ext.iter_mut().zip(&ext_idx) {
            *e = row[q];
        }
        acc.fill(0.0);
        for (t, &wk) in w.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(&ext[t..t + nx]) {
                *a += wk * v;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = a / norm;
        }
    }
    out
}

/// PFM amplitude and phase of a piezoresponse value `r` (see [`pfm_response`]): amplitude
/// `|r|·gain + noise` (clamped at 0), phase 0° where `r ≥ 0` and 180° where `r < 0`, plus
/// Gaussian phase noise of `phase_noise_deg`.
pub fn pfm_signal(
    r: f64,
    gain: f64,
    amplitude_noise: f64,
    phase_noise_deg: f64,
    rng: &mut crate::rng::SimRng,
) -> (f32, f32) {
    let amp = (r.abs() * gain + amplitude_noise * normal(rng)).max(0.0);
    let phase = if r >= 0.0 { 0.0 } else { 180.0 } + phase_noise_deg * normal(rng);
    (amp as f32, phase as f32)
}

/// PFM images of a film: [`pfm_response`] through [`pfm_signal`] at every cell. Returns
/// `(amplitude, phase_deg)` as `rows × cols` arrays.
pub fn pfm_image(
    film: &FerroFilm,
    tip_sigma: f64,
    gain: f64,
    amplitude_noise: f64,
    phase_noise_deg: f64,
    rng: &mut crate::rng::SimRng,
) -> (ndarray::Array2<f32>, ndarray::Array2<f32>) {
    let resp = pfm_response(film, tip_sigma);
    let mut amp = ndarray::Array2::<f32>::zeros(resp.dim());
    let mut phase = ndarray::Array2::<f32>::zeros(resp.dim());
    for ((r, a), p) in resp.iter().zip(amp.iter_mut()).zip(phase.iter_mut()) {
        (*a, *p) = pfm_signal(*r, gain, amplitude_noise, phase_noise_deg, rng);
    }
    (amp, phase)
}

/// Two-state analysis of a PFM phase image (see [`phase_clusters`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseClusters {
    /// Circular mean phase of the larger and the smaller cluster, degrees in [0, 360).
    pub centres: [f64; 2],
    /// Fraction of pixels in each cluster (sums to 1).
    pub fractions: [f64; 2],
    /// Angular separation of the centres, degrees in [0, 180].
    pub separation: f64,
    /// Count of the emptiest 10° bin between the centres (on either arc) over the mean count
    /// per bin of the smaller cluster's arc: small when a valley separates the two states.
    pub valley_ratio: f64,
}

impl PhaseClusters {
    /// Two domain states about 180° apart: the smaller cluster holds at least 5 % of the
    /// pixels, the centres are 180° ± 60° apart, and a valley below 20 % of the smaller
    /// cluster's density separates them.
    pub fn is_bimodal(&self) -> bool {
        self.fractions[1] >= 0.05 && self.separation >= 120.0 && self.valley_ratio < 0.2
    }
}

/// Splits phases (degrees) into two clusters by k-means on the unit circle (Lloyd iterations
/// from the circular mean and its opposite) and measures how well they separate. Non-finite
/// values are ignored; `None` when fewer than two finite values remain.
pub fn phase_clusters(phases_deg: impl IntoIterator<Item = f64>) -> Option<PhaseClusters> {
    let v: Vec<(f64, f64)> = phases_deg
        .into_iter()
        .filter(|p| p.is_finite())
        .map(|p| {
            let r = p.to_radians();
            (r.cos(), r.sin())
        })
        .collect();
    if v.len() < 2 {
        return None;
    }
    let mean = v.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let a0 = mean.1.atan2(mean.0);
    let mut c = [(a0.cos(), a0.sin()), (-a0.cos(), -a0.sin())];
    let mut label = vec![0u8; v.len()];
    for _ in 0..100 {
        let mut sums = [(0.0, 0.0); 2];
        let mut changed = false;
        for (l, &(x, y)) in label.iter_mut().zip(&v) {
            let k = u8::from(x * c[1].0 + y * c[1].1 > x * c[0].0 + y * c[0].1);
            changed |= *l != k;
            *l = k;
            sums[k as usize].0 += x;
            sums[k as usize].1 += y;
        }
        for k in 0..2 {
            let n = sums[k].0.hypot(sums[k].1);
            if n > 0.0 {
                c[k] = (sums[k].0 / n, sums[k].1 / n);
            }
        }
        if !changed {
            break;
        }
    }
    let n1 = label.iter().filter(|&&l| l == 1).count();
    let mut frac = [1.0 - n1 as f64 / v.len() as f64, n1 as f64 / v.len() as f64];
    let deg = |c: (f64, f64)| c.1.atan2(c.0).to_degrees().rem_euclid(360.0);
    let mut centres = [deg(c[0]), deg(c[1])];
    let (big, small) = if frac[0] >= frac[1] { (0, 1) } else { (1, 0) };
    centres = [centres[big], centres[small]];
    frac = [frac[big], frac[small]];
    let d = (centres[1] - centres[0]).rem_euclid(360.0);
    let separation = d.min(360.0 - d);
    // 10° histogram; the valley is the emptiest bin strictly between the centres on either arc.
    let mut hist = [0usize; 36];
    for &(x, y) in &v {
        let a = y.atan2(x).to_degrees().rem_euclid(360.0);
        hist[((a / 10.0) as usize).min(35)] += 1;
    }
    let bin = |a: f64| ((a / 10.0) as usize).min(35);
    let (b0, b1) = (bin(centres[0]), bin(centres[1]));
    let arc = |from: usize, to: usize| -> Vec<usize> {
        let mut out = Vec::new();
        let mut k = (from + 1) % 36;
        while k != to {
            out.push(k);
            k = (k + 1) % 36;
        }
        out
    };
    let valley = arc(b0, b1)
        .into_iter()
        .chain(arc(b1, b0))
        .map(|k| hist[k])
        .min()
        .unwrap_or(0);
    // The smaller cluster's arc: the bins its members fall in.
    let mut small_bins = [false; 36];
    for (&(x, y), &l) in v.iter().zip(&label) {
        if l as usize == small {
            small_bins[bin(y.atan2(x).to_degrees().rem_euclid(360.0))] = true;
        }
    }
    let nb = small_bins.iter().filter(|&&b| b).count().max(1);
    let count_small = if small == 1 { n1 } else { v.len() - n1 };
    let density = count_small as f64 / nb as f64;
    Some(PhaseClusters {
        centres,
        fractions: frac,
        separation,
        valley_ratio: valley as f64 / density.max(1e-12),
    })
}

/// Coercive biases of a hysteresis loop: the bias at which the response crosses zero going up
/// (switching to positive while the bias rises) and going down, by linear interpolation.
/// `None` where the loop does not cross.
pub fn loop_coercive(bias: &[f64], response: &[f64]) -> (Option<f64>, Option<f64>) {
    let (mut up, mut down) = (None, None);
    for k in 1..bias.len().min(response.len()) {
        let (r0, r1) = (response[k - 1], response[k]);
        let t = if r1 != r0 { r0 / (r0 - r1) } else { 0.0 };
        let v = bias[k - 1] + t * (bias[k] - bias[k - 1]);
        if r0 <= 0.0 && r1 > 0.0 && bias[k] >= bias[k - 1] && up.is_none() {
            up = Some(v);
        } else if r0 >= 0.0 && r1 < 0.0 && bias[k] <= bias[k - 1] && down.is_none() {
            down = Some(v);
        }
    }
    (up, down)
}

/// A triangle waveform 0 → +a → 0 → -a → 0 in `n` points (the BEPS sweep shape).
pub fn triangle_waveform(amplitude: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|k| {
            let t = k as f64 / n as f64 * 4.0;
            amplitude
                * if t < 1.0 {
                    t
                } else if t < 3.0 {
                    2.0 - t
                } else {
                    t - 4.0
                }
        })
        .collect()
}

/// Largest `|a − b|` over two equal runs of cells.
fn max_change(a: &[f32], b: &[f32]) -> f32 {
    // Eight running maxima, then the largest of them: the same value as one running maximum
    // (the maximum of a set of numbers does not depend on the order), and it vectorizes.
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            let d = (x[k] - y[k]).abs();
            lanes[k] = if d > lanes[k] { d } else { lanes[k] };
        }
    }
    let tail = ra
        .iter()
        .zip(rb)
        .fold(0.0f32, |m, (&u, &v)| m.max((u - v).abs()));
    lanes.iter().fold(tail, |m, &l| m.max(l))
}

/// Distance (cells) from the tip beyond which the Lorentzian tip field
/// `E(r) = amplitude / (1 + r²/width²)` is weaker than `level` (reduced field units):
/// `width·sqrt(|amplitude|/level − 1)`, 0 where the apex field is already weaker.
pub fn tip_field_reach(amplitude: f64, width: f64, level: f64) -> f64 {
    let ratio = amplitude.abs() / level;
    if ratio > 1.0 {
        width * (ratio - 1.0).sqrt()
    } else {
        0.0
    }
}

/// The moves of the switching front ([`FerroFilm::switch_pulse`]): the 16 neighbours up to
/// knight's moves, so that arrival times over the grid follow Euclidean distance within 3 %.
const STENCIL: [(i64, i64); 16] = [
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
    (-2, -1),
    (-2, 1),
    (-1, -2),
    (-1, 2),
    (1, -2),
    (1, 2),
    (2, -1),
    (2, 1),
];

/// `i mod n` in `0..n` (`i.rem_euclid(n)`), without a division for `i` in `-n..2n`.
#[inline]
fn wrap_index(i: i64, n: usize) -> usize {
    let n = n as i64;
    if (0..n).contains(&i) {
        i as usize
    } else if (-n..0).contains(&i) {
        (i + n) as usize
    } else if (n..2 * n).contains(&i) {
        (i - n) as usize
    } else {
        i.rem_euclid(n) as usize
    }
}

/// The periodic minimum-image distance of a displacement `d` on a ring of `n` cells:
/// `d.rem_euclid(n)`, then the smaller of that and `n` minus it. The same operations as
/// `rem_euclid` for `d` in `(-n, n)`, without its `fmod`.
#[inline]
fn min_image(d: f64, n: usize) -> f64 {
    let nf = n as f64;
    let d = if (0.0..nf).contains(&d) {
        d
    } else if d < 0.0 && d > -nf {
        d + nf
    } else {
        d.rem_euclid(nf)
    };
    d.min(nf - d)
}

/// Columns `from..from + len` of a periodic row of `nx` cells (`len ≤ nx + 1`: the halo of a
/// window one narrower than the film meets itself) as at most two contiguous runs `(local
/// column, film column, length)`: the part up to the row's end, then the part wrapped to its
/// start (empty when the window does not wrap).
fn column_runs(from: i64, len: usize, nx: usize) -> [(usize, usize, usize); 2] {
    let j0 = wrap_index(from, nx);
    let first = len.min(nx - j0);
    [(0, j0, first), (first, 0, len - first)]
}

/// Moves the `area` entries `(value, index)` of the largest values (ties: the lower index
/// first) to the front of `cells`, in no particular order. The order is strict, so which
/// entries those are does not depend on how they are found: a selection finds the same ones
/// as a full sort, in linear time.
fn largest_first(cells: &mut [(f32, u32)], area: usize) {
    if area < cells.len() {
        cells.select_nth_unstable_by(area, |x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    }
}

/// `p₁ + p₃ − 2p₂` for the roots `p₁ < p₂ < p₃` of `p³ − p − ε = 0`, `ε ≥ 0`: with it the
/// planar front of `∂p/∂t = D∇²p − A(p − p₁)(p − p₂)(p − p₃)` moves at
/// `sqrt(AD/2)·(p₁ + p₃ − 2p₂)` (the exact travelling wave of the cubic reaction-diffusion
/// equation; ≈ 3ε for small ε). Beyond the fold `ε = 2/(3√3)`, where `p₁` and `p₂` merge,
/// its value there (√3).
pub fn kink_asymmetry(eps: f64) -> f64 {
    let fold = 2.0 / (3.0 * 3f64.sqrt());
    let e = eps.clamp(0.0, fold);
    // Trigonometric roots: p = (2/√3)·cos(θ/3 − 2πk/3), cos θ = ε·3√3/2, θ ∈ [0, π/2]. So
    // p₃ = r·cos(θ/3) ≥ p₂ = r·cos(θ/3 − 2π/3) ≥ p₁ = r·cos(θ/3 + 2π/3), and the three sum to
    // zero (the cubic has no p² term): p₁ + p₃ − 2p₂ = −3p₂.
    let theta = (e / fold).clamp(-1.0, 1.0).acos();
    let r = 2.0 / 3f64.sqrt();
    let tau = 2.0 * std::f64::consts::PI / 3.0;
    -3.0 * r * (theta / 3.0 - tau).cos()
}

/// The constants of one explicit TDGL step (see [`FerroFilm::run`]).
#[derive(Debug, Clone, Copy)]
struct TdglConsts {
    a: f32,
    g: f32,
    k: f32,
    dt: f32,
    inv_ps: f32,
    depol: f32,
}

/// One explicit TDGL step for a run of cells: `p` and its four neighbours (`left`, `right`,
/// `up`, `down`, element by element), the local field, bias and well depth; writes the new
/// polarization to `out`. Every slice has the length of `out`. The arithmetic is the same for
/// any run length, so runs of one cell (periodic edges) and long runs (vectorized) agree bit for
/// bit.
#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn tdgl_row(
    p: &[f32],
    left: &[f32],
    right: &[f32],
    up: &[f32],
    down: &[f32],
    field: &[f32],
    bias: &[f32],
    well: &[f32],
    out: &mut [f32],
    c: TdglConsts,
) {
    let n = out.len();
    let (p, left, right, up, down) = (&p[..n], &left[..n], &right[..n], &up[..n], &down[..n]);
    let (field, bias, well) = (&field[..n], &bias[..n], &well[..n]);
    for j in 0..n {
        let nb = [left[j], right[j], up[j], down[j]];
        out[j] = tdgl_cell(p[j], nb, field[j], bias[j], well[j], c);
    }
}

/// One explicit TDGL step of one cell of polarization `pj`, with its neighbours `nb` (left,
/// right, up, down), external field, bias and well (see [`FerroFilm::run`]).
#[inline(always)]
fn tdgl_cell(pj: f32, nb: [f32; 4], field: f32, bias: f32, well: f32, c: TdglConsts) -> f32 {
    let lap = nb[0] + nb[1] + nb[2] + nb[3] - 4.0 * pj;
    let e = field * c.inv_ps + bias + c.depol;
    let dp = -c.g * (c.a * well * (pj - pj * pj * pj) - c.k * lap - e);
    (pj + c.dt * dp).clamp(-1.0, 1.0)
}

/// One explicit step of a `w × w` window ([`tdgl_row`] on each of its rows): `cur` and `next`
/// are `(w + 2) × (w + 2)` with a one-cell halo of fixed neighbours (`next`'s halo is left as
/// it is), `field`, `bias` and `well` are `w × w`, all row-major.
#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn tdgl_window(
    cur: &[f32],
    next: &mut [f32],
    field: &[f32],
    bias: &[f32],
    well: &[f32],
    w: usize,
    c: TdglConsts,
) {
    let wp = w + 2;
    for a in 1..=w {
        let (r, q) = (a * wp + 1, (a - 1) * w);
        let (p, left, right) = (
            &cur[r..r + w],
            &cur[r - 1..r - 1 + w],
            &cur[r + 1..r + 1 + w],
        );
        let (up, down) = (&cur[r - wp..r - wp + w], &cur[r + wp..r + wp + w]);
        let (field, bias, well) = (&field[q..q + w], &bias[q..q + w], &well[q..q + w]);
        let out = &mut next[r..r + w];
        for j in 0..w {
            let nb = [left[j], right[j], up[j], down[j]];
            out[j] = tdgl_cell(p[j], nb, field[j], bias[j], well[j], c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> FerroConfig {
        FerroConfig {
            random_field: Param::fixed(0.0),
            pinning_fraction: Param::fixed(0.0),
            ..Default::default()
        }
    }

    #[test]
    fn coercive_field_of_the_reduced_defaults_is_0_866() {
        assert!((coercive_field(-1.85, 1.25) / 0.866 - 1.0).abs() < 2e-3);
    }

    #[test]
    fn quasi_static_sweep_switches_at_the_coercive_field() {
        // A homogeneous film (no disorder, no gradients matter) swept slowly from -1.
        let mut film = FerroFilm::new(&clean(), [4, 4], 0).unwrap();
        film.fill(-1.0);
        let mut e = 0.80;
        let rate = 2e-5; // field per step
        let switched = loop {
            film.relax(1, e);
            if film.polarization()[[0, 0]] > 0.0 {
                break e;
            }
            e += rate;
            assert!(e < 1.2, "never switched");
        };
        println!(
            "switched at E = {switched:.4} (analytic {:.4})",
            coercive_field(-1.85, 1.25)
        );
        // Within 2 % of the analytic E_c = 0.866.
        assert!(
            (switched / coercive_field(-1.85, 1.25) - 1.0).abs() < 0.02,
            "switched at {switched}"
        );
        // And it does not switch below E_c: a film held at 0.95 E_c stays down.
        let mut film = FerroFilm::new(&clean(), [4, 4], 0).unwrap();
        film.fill(-1.0);
        film.relax(20_000, 0.95 * coercive_field(-1.85, 1.25));
        assert!(film.polarization()[[0, 0]] < 0.0);
    }

    fn written_radius(amplitude: f64, steps: usize) -> f64 {
        let mut film = FerroFilm::new(&FerroConfig::default(), [96, 96], 3).unwrap();
        film.fill(-1.0);
        film.relax(50, 0.0);
        film.set_tip_field(48.0, 48.0, amplitude, 3.0);
        film.run(steps);
        (film.up_fraction() * 96.0 * 96.0 / std::f64::consts::PI).sqrt()
    }

    #[test]
    fn written_domains_grow_with_amplitude_and_duration() {
        let by_amp: Vec<f64> = [2.0, 4.0, 8.0]
            .iter()
            .map(|&a| written_radius(a, 500))
            .collect();
        assert!(by_amp[0] > 1.0, "{by_amp:?}");
        assert!(by_amp[0] < by_amp[1] && by_amp[1] < by_amp[2], "{by_amp:?}");
        let by_time: Vec<f64> = [50, 500, 5000]
            .iter()
            .map(|&s| written_radius(4.0, s))
            .collect();
        println!(
            "radius by amplitude 2/4/8: {by_amp:.2?}; by duration 50/500/5000 steps: {by_time:.2?}"
        );
        assert!(
            by_time[0] < by_time[1] && by_time[1] < by_time[2],
            "{by_time:?}"
        );
        // Roughly logarithmic: each decade of duration adds a comparable radius.
        let ratio = (by_time[2] - by_time[1]) / (by_time[1] - by_time[0]);
        assert!(
            (0.5..=2.0).contains(&ratio),
            "per-decade growth ratio {ratio}"
        );
    }

    fn loop_for(imprint: f64) -> (f64, f64) {
        let cfg = FerroConfig {
            imprint: Param::fixed(imprint),
            ..Default::default()
        };
        let mut film = FerroFilm::new(&cfg, [48, 48], 5).unwrap();
        film.fill(-1.0);
        film.relax(50, 0.0);
        let w = triangle_waveform(3.0, 120);
        // Two cycles; the second is the steady loop.
        let mut both = w.clone();
        both.extend_from_slice(&w);
        let r = film.switching_spectroscopy(24.0, 24.0, &both, 4.0, 40);
        let (up, down) = loop_coercive(&both[w.len()..], &r[w.len()..]);
        (up.expect("switches up"), down.expect("switches down"))
    }

    #[test]
    fn switching_spectroscopy_gives_a_loop_shifted_by_the_imprint() {
        let (up0, down0) = loop_for(0.0);
        println!("loop without imprint: +{up0:.3} / {down0:.3}");
        assert!(up0 > 0.3 && down0 < -0.3, "hysteresis: {up0} {down0}");
        assert!(
            (up0 + down0).abs() < 0.25,
            "symmetric without imprint: {up0} {down0}"
        );
        let (up1, down1) = loop_for(0.3);
        println!("loop with imprint 0.3: +{up1:.3} / {down1:.3}");
        // A built-in bias of +0.3 helps the up switch and hinders the down switch.
        assert!(up1 < up0 && down1 < down0, "{up1} {down1} vs {up0} {down0}");
        let shift = 0.5 * ((up1 + down1) - (up0 + down0));
        // The loop centre moves toward negative bias. In bias units the shift is larger than the
        // imprint itself, because the response averages over a region where the tip field is
        // below its apex value.
        assert!(
            shift < -0.15,
            "loop centre shifted by {shift}, expected clearly negative"
        );
    }

    /// The tabulated [`smooth_periodic`] against the plain periodic convolution (columns, then
    /// rows), bit for bit.
    #[test]
    fn smooth_periodic_is_the_plain_periodic_blur_bit_for_bit() {
        let (ny, nx) = (20usize, 36usize);
        let mut rng = seeded(4);
        let v: Vec<f64> = (0..ny * nx).map(|_| normal(&mut rng)).collect();
        for sigma in [0.2, 0.5, 1.7, 4.0, 12.0] {
            let got = smooth_periodic(&v, [ny, nx], sigma);
            if sigma < 0.3 {
                assert_eq!(got, v);
                continue;
            }
            let r = (3.0 * sigma).ceil() as i64;
            let w: Vec<f64> = (-r..=r)
                .map(|k| (-((k * k) as f64) / (2.0 * sigma * sigma)).exp())
                .collect();
            let norm: f64 = w.iter().sum();
            let at = |i: i64, n: usize| i.rem_euclid(n as i64) as usize;
            let mut tmp = vec![0.0; ny * nx];
            for i in 0..ny {
                for j in 0..nx {
                    let mut acc = 0.0;
                    for (t, wk) in w.iter().enumerate() {
                        acc += wk * v[i * nx + at(j as i64 + t as i64 - r, nx)];
                    }
                    tmp[i * nx + j] = acc / norm;
                }
            }
            for i in 0..ny {
                for j in 0..nx {
                    let mut acc = 0.0;
                    for (t, wk) in w.iter().enumerate() {
                        acc += wk * tmp[at(i as i64 + t as i64 - r, ny) * nx + j];
                    }
                    let want: f64 = acc / norm;
                    assert_eq!(got[i * nx + j].to_bits(), want.to_bits(), "sigma {sigma}");
                }
            }
        }
    }

    /// `column_runs` lists the columns `(from + k) mod nx`, `k < len`, in order, as two
    /// contiguous runs whose local columns follow on: every start within three periods, every
    /// length up to the row's plus one.
    #[test]
    fn column_runs_cover_the_window_in_order() {
        for nx in 1..12usize {
            for from in -3 * nx as i64..3 * nx as i64 {
                for len in 0..=nx + 1 {
                    let runs = column_runs(from, len, nx);
                    let listed: Vec<(usize, usize)> = runs
                        .iter()
                        .flat_map(|&(o, j, n)| (0..n).map(move |k| (o + k, j + k)))
                        .collect();
                    let want: Vec<(usize, usize)> = (0..len)
                        .map(|k| (k, (from + k as i64).rem_euclid(nx as i64) as usize))
                        .collect();
                    assert_eq!(listed, want, "nx {nx}, from {from}, len {len}");
                }
            }
        }
    }

    /// The tabulated [`pfm_response`] against the plain periodic convolution (rows, then
    /// columns, taps summed from offset -r), bit for bit, for several widths and a film that is
    /// not square.
    #[test]
    fn periodic_helpers_equal_rem_euclid() {
        for n in [1usize, 2, 5, 64] {
            let ni = n as i64;
            for i in -3 * ni..3 * ni {
                assert_eq!(wrap_index(i, n), i.rem_euclid(ni) as usize, "{i} mod {n}");
            }
            let nf = n as f64;
            let mut rng = seeded(n as u64);
            let edges = [
                0.0,
                -0.0,
                nf,
                -nf,
                2.0 * nf,
                -2.0 * nf,
                0.5,
                -0.5,
                nf - 1e-12,
            ];
            let draws: Vec<f64> = (0..2000)
                .map(|_| rng.random_range(-3.0 * nf..3.0 * nf))
                .collect();
            for d in edges.into_iter().chain(draws) {
                let r = d.rem_euclid(nf);
                let want = r.min(nf - r);
                assert_eq!(min_image(d, n).to_bits(), want.to_bits(), "{d} on {n}");
            }
        }
    }

    #[test]
    fn max_change_is_the_largest_absolute_difference() {
        let mut rng = seeded(6);
        for n in [0usize, 1, 7, 8, 9, 33, 100] {
            let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let plain = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .fold(0.0f32, |m, (&u, &v)| m.max((u - v).abs()))
            };
            assert_eq!(
                max_change(&a, &b).to_bits(),
                plain(&a, &b).to_bits(),
                "n {n}"
            );
            if n > 3 {
                // A NaN is passed over, as f32::max does.
                b[3] = f32::NAN;
                assert_eq!(
                    max_change(&a, &b).to_bits(),
                    plain(&a, &b).to_bits(),
                    "n {n}"
                );
            }
        }
    }

    #[test]
    fn largest_first_selects_what_a_full_sort_puts_first() {
        let mut rng = seeded(4);
        for n in [0usize, 1, 2, 7, 64, 1000] {
            // Values on a coarse grid, so that many tie and the index decides.
            let cells: Vec<(f32, u32)> = (0..n as u32)
                .map(|c| ((rng.random_range(0..6) as f32) * 0.25, c * 7 % 1009))
                .collect();
            let mut sorted = cells.clone();
            sorted.sort_unstable_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            for area in [0, n / 3, n / 2, n.saturating_sub(1), n] {
                let mut got = cells.clone();
                largest_first(&mut got, area);
                let mut front: Vec<u32> = got[..area].iter().map(|c| c.1).collect();
                let mut want: Vec<u32> = sorted[..area].iter().map(|c| c.1).collect();
                front.sort_unstable();
                want.sort_unstable();
                assert_eq!(front, want, "n {n}, area {area}");
            }
        }
    }

    #[test]
    fn pfm_response_is_the_plain_periodic_blur_bit_for_bit() {
        let mut film = FerroFilm::new(&FerroConfig::default(), [24, 40], 5).unwrap();
        let mut rng = seeded(9);
        for v in film.polarization_mut() {
            *v = rng.random_range(-1.0..1.0);
        }
        for sigma in [0.0, 0.4, 1.3, 3.0, 9.0] {
            let p = film.polarization();
            let (ny, nx) = p.dim();
            let r = (3.0 * f64::max(sigma, 0.0)).ceil() as i64;
            let w: Vec<f64> = (-r..=r)
                .map(|k| (-(k * k) as f64 / (2.0 * f64::max(sigma, 1e-6).powi(2))).exp())
                .collect();
            let norm: f64 = w.iter().sum();
            let mut mid = ndarray::Array2::<f64>::zeros((ny, nx));
            for i in 0..ny {
                for j in 0..nx {
                    let mut acc = 0.0;
                    for (t, &wk) in w.iter().enumerate() {
                        let ii = (i as i64 + t as i64 - r).rem_euclid(ny as i64) as usize;
                        acc += wk * f64::from(p[[ii, j]]);
                    }
                    mid[[i, j]] = acc / norm;
                }
            }
            let mut want = ndarray::Array2::<f64>::zeros((ny, nx));
            for i in 0..ny {
                for j in 0..nx {
                    let mut acc = 0.0;
                    for (t, &wk) in w.iter().enumerate() {
                        let jj = (j as i64 + t as i64 - r).rem_euclid(nx as i64) as usize;
                        acc += wk * mid[[i, jj]];
                    }
                    want[[i, j]] = acc / norm;
                }
            }
            let got = pfm_response(&film, sigma);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "sigma {sigma}"
            );
        }
    }

    #[test]
    fn pfm_phase_is_bimodal_180_degrees_apart_and_amplitude_dips_at_walls() {
        let mut film = FerroFilm::new(&FerroConfig::default(), [64, 64], 2).unwrap();
        film.fill(-1.0);
        film.relax(20, 0.0);
        film.set_tip_field(32.0, 32.0, 6.0, 4.0);
        film.run(400);
        film.relax(50, 0.0);
        let mut rng = seeded(4);
        let (amp, phase) = pfm_image(&film, 1.5, 1.0, 0.02, 5.0, &mut rng);
        let near = |c: f32| {
            phase.iter().filter(|&&v| (v - c).abs() < 20.0).count() as f64 / phase.len() as f64
        };
        let (up, down) = (near(0.0), near(180.0));
        assert!(up > 0.05 && down > 0.05 && up + down > 0.98, "{up} {down}");
        // Amplitude is lower at the domain wall than inside either domain.
        let up_amp: f32 = amp[[32, 32]];
        let far: f32 = amp[[2, 2]];
        let wall = (0..64).map(|j| amp[[32, j]]).fold(f32::INFINITY, f32::min);
        assert!(
            wall < 0.5 * up_amp.min(far),
            "wall {wall} vs {up_amp} {far}"
        );
    }

    #[test]
    fn windowed_run_matches_the_full_run_for_a_local_pulse() {
        let mut full = FerroFilm::new(&FerroConfig::default(), [96, 96], 8).unwrap();
        full.fill(-1.0);
        full.relax(100, 0.0);
        let mut win = full.clone();
        full.set_tip_field(40.0, 50.0, 5.0, 3.0);
        win.set_tip_field(40.0, 50.0, 5.0, 3.0);
        full.run(400);
        win.run_window(400, 40.0, 50.0, 24);
        let (pf, pw) = (full.polarization(), win.polarization());
        let worst = pf
            .iter()
            .zip(pw.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let switched = pw.iter().filter(|&&v| v > 0.0).count();
        assert!(switched > 20, "a domain was written: {switched} cells");
        assert!(worst < 0.02, "largest difference {worst}");
        assert_eq!(full.time, win.time);
    }

    /// The explicit step cell by cell with periodic wrap: the reference the vectorized rows
    /// must match bit for bit.
    fn reference_step(f: &FerroFilm, cells: &[(usize, usize)]) -> Vec<f32> {
        let [ny, nx] = f.shape;
        let inv_ps = 1.0 / f.ps;
        let depol = if f.depol == 0.0 {
            0.0
        } else {
            -f.depol * f.p.iter().sum::<f32>() / f.p.len() as f32 * inv_ps
        };
        let mut p = f.p.clone();
        for &(i, j) in cells {
            let at = |i: usize, j: usize| f.p[(i % ny) * nx + j % nx];
            let c = i * nx + j;
            let pc = f.p[c];
            let lap =
                at(i, j + nx - 1) + at(i, j + 1) + at(i + ny - 1, j) + at(i + 1, j) - 4.0 * pc;
            let e = f.field[c] * inv_ps + f.bias[c] + depol;
            let dp = -f.gamma * (f.alpha * f.well[c] * (pc - pc * pc * pc) - f.gradient * lap - e);
            p[c] = (pc + f.dt * dp).clamp(-1.0, 1.0);
        }
        p
    }

    #[test]
    fn vectorized_steps_match_the_cell_by_cell_step_exactly() {
        let mut film = FerroFilm::new(&FerroConfig::default(), [40, 36], 5).unwrap();
        film.set_tip_field(20.0, 17.0, 2.0, 3.0);
        for _ in 0..3 {
            let all: Vec<_> = (0..40).flat_map(|i| (0..36).map(move |j| (i, j))).collect();
            let want = reference_step(&film, &all);
            film.run(1);
            assert_eq!(film.p, want, "full step");
        }
        // Interior window (contiguous rows) and a window across the corner (wrapped).
        for (x, y) in [(18.0, 20.0), (1.0, 38.0)] {
            let half = 4usize;
            let cells: Vec<_> = (-4i64..=4)
                .flat_map(|di| {
                    (-4i64..=4).map(move |dj| {
                        (
                            (y as i64 + di).rem_euclid(40) as usize,
                            (x as i64 + dj).rem_euclid(36) as usize,
                        )
                    })
                })
                .collect();
            let want = reference_step(&film, &cells);
            film.run_window(1, x, y, half);
            assert_eq!(film.p, want, "window at ({x}, {y})");
            // Several steps in one call (no depolarization, so the field is the same) ...
            let mut want = film.clone();
            for _ in 0..5 {
                want.p = reference_step(&want, &cells);
            }
            let t0 = film.time;
            film.run_window(5, x, y, half);
            assert_eq!(film.p, want.p, "5 steps at ({x}, {y})");
            assert_eq!(film.time, t0 + 5.0 * f64::from(film.dt));
            // ... and until the window settles: the steps it reports, the last one's change
            // below the tolerance, the one before it not.
            let tol = 2e-3;
            let mut want = film.clone();
            let ran = film.run_window_settling(400, x, y, half, tol);
            assert!(ran > 1 && ran < 400, "settled after {ran} steps");
            let mut changes = Vec::new();
            for _ in 0..ran {
                let next = reference_step(&want, &cells);
                changes.push(max_change(&want.p, &next));
                want.p = next;
            }
            assert_eq!(film.p, want.p, "settling at ({x}, {y})");
            assert!(
                changes[ran - 1] < tol && changes[ran - 2] >= tol,
                "{changes:?}"
            );
        }
    }

    #[test]
    fn phase_clusters_tell_two_states_from_one() {
        let mut rng = seeded(11);
        // Two states 180° apart with 10° noise, 70/30.
        let two: Vec<f64> = (0..4000)
            .map(|k| if k % 10 < 7 { 20.0 } else { 200.0 } + 10.0 * normal(&mut rng))
            .collect();
        let c = phase_clusters(two).unwrap();
        assert!(c.is_bimodal(), "{c:?}");
        assert!((c.separation - 180.0).abs() < 5.0 && (c.fractions[1] - 0.3).abs() < 0.03);
        // One broad state (60° noise) is not two states.
        let one: Vec<f64> = (0..4000).map(|_| 20.0 + 60.0 * normal(&mut rng)).collect();
        let c = phase_clusters(one).unwrap();
        assert!(!c.is_bimodal(), "{c:?}");
        // Two states only 90° apart are not the ferroelectric pair.
        let near: Vec<f64> = (0..4000)
            .map(|k| if k % 2 == 0 { 0.0 } else { 90.0 } + 8.0 * normal(&mut rng))
            .collect();
        assert!(!phase_clusters(near).unwrap().is_bimodal());
        assert!(phase_clusters([f64::NAN, 1.0]).is_none());
    }

    #[test]
    fn correlated_random_field_keeps_its_rms_and_gains_a_correlation_length() {
        let stats = |corr: f64| {
            let cfg = FerroConfig {
                random_field: Param::fixed(0.3),
                random_field_correlation: Param::fixed(corr),
                imprint: Param::fixed(0.0),
                ..Default::default()
            };
            let film = FerroFilm::new(&cfg, [64, 64], 9).unwrap();
            let b: Vec<f64> = film
                .bias
                .iter()
                .map(|&v| f64::from(v) * f64::from(film.ps))
                .collect();
            let rms = (b.iter().map(|v| v * v).sum::<f64>() / b.len() as f64).sqrt();
            // Neighbour correlation along x at lag 4 cells.
            let lag = |l: usize| {
                let mut s = 0.0;
                for i in 0..64 {
                    for j in 0..64 {
                        s += b[i * 64 + j] * b[i * 64 + (j + l) % 64];
                    }
                }
                s / (64.0 * 64.0) / (rms * rms)
            };
            (rms, lag(4))
        };
        let (r0, c0) = stats(0.0);
        let (r1, c1) = stats(4.0);
        assert!(
            (r0 / 0.3 - 1.0).abs() < 0.05 && (r1 / 0.3 - 1.0).abs() < 1e-6,
            "{r0} {r1}"
        );
        // A Gaussian of σ = 4 cells: correlation exp(-l²/4σ²) = exp(-1/4) ≈ 0.78 at lag 4.
        assert!(c0.abs() < 0.1, "uncorrelated: {c0}");
        assert!((c1 - (-0.25f64).exp()).abs() < 0.1, "correlated: {c1}");
    }

    #[test]
    fn triangle_waveform_has_the_beps_shape() {
        let w = triangle_waveform(8.5, 64);
        assert_eq!(w[0], 0.0);
        assert!((w[16] - 8.5).abs() < 1e-12 && (w[48] + 8.5).abs() < 1e-12);
        assert!(w.iter().all(|v| v.abs() <= 8.5));
    }

    #[test]
    fn bad_config_names_the_field() {
        let cfg = FerroConfig {
            dt: Param::fixed(1.0),
            ..Default::default()
        };
        assert!(
            cfg.validate("ferroelectric.")
                .unwrap_err()
                .to_string()
                .contains("ferroelectric.dt")
        );
        let cfg = FerroConfig {
            alpha: Param::fixed(1.0),
            ..Default::default()
        };
        assert!(
            cfg.validate("ferroelectric.")
                .unwrap_err()
                .to_string()
                .contains("ferroelectric.alpha")
        );
    }

    #[test]
    fn light_tip_protocol_writes_the_domain_of_the_full_one() {
        // Reference: the full integration (every step, window max(4·width, 12)). The light one
        // (time step 2.5× longer, window where E ≥ 0.1 plus 4 cells, early stop) writes a
        // domain of the same area within 10 %. Three pulses on one disordered film, each from
        // the same state.
        let mut base = FerroFilm::new(&FerroConfig::default(), [64, 64], 5).unwrap();
        base.fill(-1.0);
        base.relax(100, 0.0);
        let full = TipProtocol {
            width: 5.0,
            half: 20,
            field_per_volt: 0.25,
            bias_offset: 0.0,
            light: None,
            switching: None,
        };
        let light = TipProtocol {
            light: Some(LightTdgl {
                reach_level: 0.1,
                margin: 4.0,
                tol: 1e-5,
            }),
            ..full
        };
        for bias in [5.0, 7.0, 9.0] {
            let (mut a, mut b) = (base.clone(), base.clone());
            a.tip_pulse(30.0, 33.0, bias, 1000, 100, &full);
            b.set_time_step(0.05).unwrap();
            b.tip_pulse(30.0, 33.0, bias, 400, 40, &light);
            let (ua, ub) = (a.up_fraction(), b.up_fraction());
            eprintln!("{bias} V: up fraction full {ua}, light {ub}");
            assert!(ua > 0.005, "{bias} V wrote a domain: {ua}");
            assert!(
                (ub / ua - 1.0).abs() < 0.1,
                "{bias} V: full {ua}, light {ub}"
            );
        }
    }

    #[test]
    fn windowed_tip_field_is_the_tip_field_inside_the_window() {
        let mut a = FerroFilm::new(&FerroConfig::default(), [40, 40], 1).unwrap();
        let mut b = a.clone();
        b.set_uniform_field(-7.0);
        a.set_tip_field(38.6, 1.2, 2.0, 3.0);
        b.set_tip_field_window(38.6, 1.2, 2.0, 3.0, 6);
        let (fa, fb) = (&a.field, &b.field);
        let mut inside = 0;
        for i in 0..40i64 {
            for j in 0..40i64 {
                let near = |d: i64| d.rem_euclid(40).min((-d).rem_euclid(40)) <= 6;
                if near(i - 1) && near(j - 39) {
                    inside += 1;
                    assert_eq!(fa[(i * 40 + j) as usize], fb[(i * 40 + j) as usize]);
                } else {
                    // Outside the window the field is left as it was.
                    assert_eq!(fb[(i * 40 + j) as usize], -7.0);
                }
            }
        }
        assert_eq!(inside, 13 * 13);
        // The reach: E(reach) = level, closed form.
        let r = tip_field_reach(2.0, 3.0, 0.1);
        assert!((2.0 / (1.0 + r * r / 9.0) - 0.1).abs() < 1e-12);
        assert_eq!(tip_field_reach(0.05, 3.0, 0.1), 0.0);
    }

    /// The light switching model against the TDGL it replaces, on the default film (random
    /// field 0.1, 5 % pinning sites) under a tip 6.4 cells wide: written-domain area (cells)
    /// for apex fields 1.5, 2 and 3 (reduced) × pulses of 1, 3.16 and 10 time units,
    /// writing (on a film poled down) and erasing (poled up), mean and spread over 4 seeds.
    /// The TDGL runs its time step 0.02; the light model the fast model's 0.05
    /// (`FAST_DT_FACTOR`). Tolerance: the mean within 25 % + 8 cells, the spread within
    /// 8 cells + 50 %; the mean wall length (neighbour pairs of opposite sign, which the
    /// roughness of the walls lengthens) within 20 % + 4. (With `wall_smoothing` 0 the light
    /// model passes too: an isolated domain on this film has about the TDGL's wall length
    /// either way; the smoothing is fitted on the domain-writing task's phase images.)
    #[test]
    fn light_switching_writes_the_domains_of_the_tdgl() {
        let full = TipProtocol {
            width: 6.4,
            half: 26,
            field_per_volt: 1.0,
            bias_offset: 0.0,
            light: None,
            switching: None,
        };
        let light = TipProtocol {
            switching: Some(crate::spm::sim::FAST_SWITCHING),
            ..full
        };
        let stats = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            (m, sd)
        };
        let mut ok = true;
        for sign in [1.0f64, -1.0] {
            for a in [1.5, 2.0, 3.0] {
                for tau in [1.0, 3.16, 10.0] {
                    let (mut af, mut al, mut wf, mut wl) = (vec![], vec![], vec![], vec![]);
                    for seed in 0..4 {
                        let mut base =
                            FerroFilm::new(&FerroConfig::default(), [64, 64], seed).unwrap();
                        base.fill(-sign as f32);
                        base.relax(100, 0.0);
                        let written = |f: &FerroFilm| {
                            f.p.iter().filter(|&&v| f64::from(v) * sign > 0.0).count() as f64
                        };
                        // Wall length: nearest-neighbour pairs of opposite sign (periodic).
                        let walls = |f: &FerroFilm| {
                            let up = |i: usize, j: usize| f.p[(i % 64) * 64 + j % 64] > 0.0;
                            (0..64)
                                .flat_map(|i| (0..64).map(move |j| (i, j)))
                                .map(|(i, j)| {
                                    usize::from(up(i, j) != up(i + 1, j))
                                        + usize::from(up(i, j) != up(i, j + 1))
                                })
                                .sum::<usize>() as f64
                        };
                        let mut f = base.clone();
                        let steps = (tau / 0.02f64).round() as usize;
                        f.tip_pulse(32.0, 31.0, sign * a, steps, steps / 10, &full);
                        af.push(written(&f));
                        wf.push(walls(&f));
                        let mut l = base.clone();
                        l.set_time_step(0.05).unwrap();
                        let steps = (tau / 0.05f64).round() as usize;
                        l.tip_pulse(32.0, 31.0, sign * a, steps, steps / 10, &light);
                        al.push(written(&l));
                        wl.push(walls(&l));
                    }
                    let ((mf, sf), (ml, sl)) = (stats(&af), stats(&al));
                    let ((lf, _), (ll, _)) = (stats(&wf), stats(&wl));
                    eprintln!(
                        "sign {sign} E {a} t {tau}: TDGL {mf:.1} ± {sf:.1}, light {ml:.1} ± {sl:.1}; \
                         wall length TDGL {lf:.1}, light {ll:.1}"
                    );
                    ok &= mf > 10.0
                        && (ml - mf).abs() <= 0.25 * mf + 8.0
                        && (sl - sf).abs() <= 8.0 + 0.5 * sf
                        && (ll - lf).abs() <= 0.2 * lf + 4.0;
                }
            }
        }
        assert!(ok, "see the table above");
    }

    #[test]
    fn kink_asymmetry_is_the_cubic_front_speed() {
        // Small drive: 3ε (the linear mobility of the TDGL kink).
        assert!((kink_asymmetry(1e-4) / 3e-4 - 1.0).abs() < 1e-3);
        // At the fold the two lower roots merge at -1/√3 and the upper one is 2/√3: √3.
        let fold = 2.0 / (3.0 * 3f64.sqrt());
        assert!((kink_asymmetry(fold) - 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(kink_asymmetry(1.0), kink_asymmetry(fold));
        // ε = 0.2: roots of p³ − p − 0.2 found by bisection.
        let root = |mut lo: f64, mut hi: f64| {
            for _ in 0..100 {
                let mid = 0.5 * (lo + hi);
                let f = |p: f64| p * p * p - p - 0.2;
                if f(lo) * f(mid) <= 0.0 {
                    hi = mid
                } else {
                    lo = mid
                }
            }
            lo
        };
        let (p1, p2, p3) = (root(-1.2, -0.6), root(-0.5, 0.3), root(0.8, 1.5));
        assert!((kink_asymmetry(0.2) - (p1 + p3 - 2.0 * p2)).abs() < 1e-9);
    }
}
