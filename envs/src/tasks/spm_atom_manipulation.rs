//! `scopegym/SpmAtomManipulation-v1`: drag an Ag adatom on Ag(111) to a goal site by STM
//! lateral manipulation (anchor: SINGROUP's RL atom manipulation).
//!
//! The instrument images a small field (`pixels²`, `field` wide, fixed at the centre of the
//! scan range so the scanner never creeps) with one adatom in it. At reset the atom is detected
//! in a frame and the goal is set a random lattice vector (`goal_distance` long) away from it,
//! so the goal is a hollow site of the atom's kind. Each step drags the tip along the action's
//! path through the `LateralManipulation` trait, then scans the frame again and detects the atom
//! there (never from ground truth): the brightest blob of the apparent height, averaged over
//! trace and retrace (which cancels the feedback lag) and levelled line by line, located as the
//! centroid of the pixels above half its peak within `0.6 nm` of the peak.
//!
//! - **Observation** (Box, 4): `[goal − atom (x, y), atom displacement in the last step (x,
//!   y)]`, nm, both from the detected positions (lab frame), clipped to `±obs_clip`.
//! - **Action** (Box, 6): `[start x, start y, end x, end y]` of the tip path relative to the
//!   detected atom, nm, each in `±reach`; bias in `[0, 15]` mV; conductance in `[0.1, 6]`
//!   nA/mV (passed to the trait in S: 1 nA/mV = 1e-6 S).
//! - **Reward**: `-1` per step, plus the potential shaping `d_before − d_after` (detected
//!   distances to the goal, nm), plus `success_bonus` on success, minus `lost_penalty` when
//!   the atom is lost.
//! - **Success** (terminates): the detected atom lies within `success_radius` (default `a/√3 ≈
//!   0.166 nm`, the hollow-site spacing) of the goal. **Lost** (terminates): no adatom is
//!   detected in the frame (picked up by the tip, or dragged out of view).
//! - **Info** (never in the observation): `atom_true` (the true atom in the lab frame, m, empty
//!   when it was picked up), `true_distance` (m, or −1), `atom_detected` and `goal` (lab, m),
//!   `success`, `lost`, and the randomized scenario values (`param.*`).
//! - **Heuristic**: the operator's drag: start 0.05 nm behind the atom, pull straight through
//!   it toward the goal (at most `reach` per axis per step) at 2 mV and 6 nA/mV (low bias, high
//!   conductance: strong coupling, few pick-ups).

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, check_nonnegative, check_positive, config_from_toml};
use rand::Rng;
use scopegym_physics::instrument::{LateralManipulation, ScanSettings, SpmInstrument, SpmMode};
use scopegym_physics::param::Param;
use scopegym_physics::rng::seeded;
use scopegym_physics::spm::manipulation::{AG111_A, MAX_BIAS, MAX_CONDUCTANCE};
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use scopegym_physics::spm::surface::SurfaceKind;
use serde::{Deserialize, Serialize};

/// Task settings (`config = {...}` or a scenario's `[task]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Difficulty level (`"easy"`, `"medium"`, `"hard"`): picks the defaults of the
    /// domain-randomization ranges (module docs). Default `"medium"`.
    pub difficulty: Difficulty,
    /// Parameter split (`"train"`, or the held-out `"test"`): which bands of every randomized
    /// range episodes draw from ([`crate::level`]). Default `"train"`.
    pub split: Split,
    /// The simulated instrument (STM mode).
    pub instrument: SpmConfig,
    /// Pixels per side of the frame. Default 40.
    pub pixels: usize,
    /// Field of view, m (centred on the scan range). Default 4.8 nm.
    pub field: f64,
    /// Line rate, Hz. Default 10.
    pub line_rate: f64,
    /// Steps per episode. Default 20.
    pub max_steps: usize,
    /// Largest tip offset from the atom per axis, m. Default 1 nm.
    pub reach: f64,
    /// Lattice constant of the surface, m (the goal is a lattice vector from the atom).
    /// Default 0.288 nm.
    pub lattice_constant: f64,
    /// Shortest and longest goal distance, m. Default 0.5 and 2 nm.
    pub goal_distance: [f64; 2],
    /// Success radius, m. Default `a/√3` (0.166 nm).
    pub success_radius: f64,
    /// Smallest blob peak (above the levelled background) that counts as an atom, m.
    /// Default 0.04 nm.
    pub detect_height: f64,
    /// Observation clip, nm. Default 10.
    pub obs_clip: f64,
    /// Reward on success. Default 5.
    pub success_bonus: f64,
    /// Reward lost when the atom is lost. Default 10.
    pub lost_penalty: f64,
}

impl Default for Config {
    fn default() -> Self {
        let mut inst = SpmConfig {
            mode: SpmMode::Stm,
            ..SpmConfig::default()
        };
        inst.bias = Param::fixed(0.1);
        inst.sample.size = Param::fixed(8e-9);
        inst.sample.pixels = 100;
        inst.sample.crash_threshold = Param::fixed(0.5e-9);
        inst.scan.pixels = [40, 40];
        inst.scan.size = Param::fixed(4.8e-9);
        inst.scan.line_rate = Param::fixed(10.0);
        inst.surface.kind = SurfaceKind::Flat;
        inst.surface.roughness = Param::fixed(0.0);
        inst.adatoms.count = 1;
        inst.adatoms.margin = Param::fixed(2.8e-9);
        let t = &mut inst.tip;
        t.initial_radius = Param::fixed(0.5e-9);
        t.min_radius = Param::fixed(0.3e-9);
        t.good_radius = Param::fixed(0.6e-9);
        t.max_radius = Param::fixed(5e-9);
        t.wear_rate = Param::fixed(0.0);
        t.adsorbate_rate = Param::fixed(0.0);
        let f = &mut inst.feedback;
        f.p_gain = Param::fixed(0.1);
        f.i_gain = Param::fixed(300.0);
        f.z_speed_limit = Param::fixed(100e-9);
        let s = &mut inst.scanner;
        s.drift_initial = Param::fixed(0.05e-9 / 60.0);
        s.drift_settled = Param::fixed(0.01e-9 / 60.0);
        s.white_noise = Param::fixed(2e-12);
        s.pink_noise = Param::fixed(3e-12);
        s.line_offset = Param::fixed(2e-12);
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument: inst,
            pixels: 40,
            field: 4.8e-9,
            line_rate: 10.0,
            max_steps: 20,
            reach: 1e-9,
            lattice_constant: AG111_A,
            goal_distance: [0.5e-9, 2.0e-9],
            success_radius: AG111_A / 3f64.sqrt(),
            detect_height: 0.04e-9,
            obs_clip: 10.0,
            success_bonus: 5.0,
            lost_penalty: 10.0,
        }
    }
}

impl TaskConfig for Config {
    fn at_level(difficulty: Difficulty) -> Self {
        Self {
            difficulty,
            ..Self::default()
        }
    }
}

impl Config {
    /// Checks ranges, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.instrument
            .validate()
            .map_err(|e| EnvError::config("instrument", e.to_string()))?;
        let bad = |f: &str, r: String| Err(EnvError::config(f, r));
        if self.instrument.mode != SpmMode::Stm {
            return bad("instrument.mode", "must be \"stm\"".into());
        }
        if !(8..=256).contains(&self.pixels) {
            return bad("pixels", format!("must be 8..=256, got {}", self.pixels));
        }
        let size = self.instrument.sample.size.get();
        if !(self.field > 0.0 && self.field <= size) {
            return bad(
                "field",
                format!("must be in (0, instrument.sample.size], got {}", self.field),
            );
        }
        if !(self.line_rate > 0.0 && self.line_rate <= 1000.0) {
            return bad(
                "line_rate",
                format!("must be in (0, 1000] Hz, got {}", self.line_rate),
            );
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1".into());
        }
        if !(self.reach > 0.0 && self.reach <= 0.25 * size) {
            return bad(
                "reach",
                format!("must be in (0, sample.size/4], got {}", self.reach),
            );
        }
        if !(self.lattice_constant >= 1e-10 && self.lattice_constant <= 1e-9) {
            return bad(
                "lattice_constant",
                format!("must be in [0.1, 1] nm, got {}", self.lattice_constant),
            );
        }
        let [g0, g1] = self.goal_distance;
        if !(g0 > 0.0 && g0 <= g1 && g1 < self.field) {
            return bad(
                "goal_distance",
                format!(
                    "must be increasing, positive and below field, got {:?}",
                    self.goal_distance
                ),
            );
        }
        check_positive(&[
            ("success_radius", self.success_radius),
            ("detect_height", self.detect_height),
            ("obs_clip", self.obs_clip),
        ])?;
        check_nonnegative(&[
            ("success_bonus", self.success_bonus),
            ("lost_penalty", self.lost_penalty),
        ])?;
        Ok(())
    }
}

/// The brightest blob of an `n × n` levelled height image (row-major, m, pixel `pixel` m,
/// centred on `center`): its centroid in lab coordinates, or `None` when its peak is below
/// `min_height`.
pub fn detect_atom(
    img: &[f32],
    n: usize,
    pixel: f64,
    center: [f64; 2],
    min_height: f64,
) -> Option<[f64; 2]> {
    if n == 0 || img.len() != n * n {
        return None;
    }
    let (k, &peak) = img
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .max_by(|a, b| a.1.total_cmp(b.1))?;
    if f64::from(peak) < min_height {
        return None;
    }
    let (pi, pj) = ((k / n) as f64, (k % n) as f64);
    let thr = 0.5 * peak;
    let r = 0.6e-9 / pixel;
    let (mut w, mut sx, mut sy) = (0.0, 0.0, 0.0);
    for (idx, &v) in img.iter().enumerate() {
        let (i, j) = ((idx / n) as f64, (idx % n) as f64);
        if v > thr && (i - pi).hypot(j - pj) <= r {
            let wt = f64::from(v - thr);
            w += wt;
            sx += wt * j;
            sy += wt * i;
        }
    }
    if !(w > 0.0) {
        return None;
    }
    let mid = 0.5 * (n as f64 - 1.0);
    Some([
        center[0] + (sx / w - mid) * pixel,
        center[1] + (sy / w - mid) * pixel,
    ])
}

/// Ground truth about the adatoms, for `info` (the simulator knows it, a real driver does not).
pub trait AtomTruth {
    /// The true adatom positions in the lab frame, m (a real instrument returns none).
    fn true_atoms_lab(&self) -> Vec<[f64; 2]> {
        Vec::new()
    }
}

impl AtomTruth for SpmSimulator {
    fn true_atoms_lab(&self) -> Vec<[f64; 2]> {
        self.adatoms()
            .iter()
            .map(|&p| self.sample_to_lab(p))
            .collect()
    }
}

/// The task over any STM instrument `I` that manipulates atoms.
#[derive(Debug)]
pub struct SpmAtomManipulation<I> {
    cfg: Config,
    inst: I,
    img: Vec<f32>,
    atom: [f64; 2],
    goal: [f64; 2],
    last_obs: [f32; 4],
}

impl SpmAtomManipulation<SpmSimulator> {
    /// The task on the simulator, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = SpmSimulator::new(cfg.instrument.clone(), 0)?;
        Ok(Self::new(cfg, inst))
    }
}

impl<I: SpmInstrument + LateralManipulation + AtomTruth + NewEpisode + Send>
    SpmAtomManipulation<I>
{
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        Self {
            img: vec![0.0; cfg.pixels * cfg.pixels],
            cfg,
            inst,
            atom: [0.0; 2],
            goal: [0.0; 2],
            last_obs: [0.0; 4],
        }
    }

    fn settings(&self) -> ScanSettings {
        let n = self.cfg.pixels;
        ScanSettings {
            rows: n,
            cols: n,
            pixel_size: self.cfg.field / n as f64,
            dwell_time: 1.0 / (2.0 * self.cfg.line_rate * n as f64),
            flyback_time: 0.0,
            center: [0.0, 0.0],
        }
    }

    /// Scans the frame (trace and retrace averaged, lines levelled) and detects the atom.
    fn scan_and_detect(&mut self) -> Result<Option<[f64; 2]>> {
        let f = self.inst.acquire_frame()?;
        let get = |name: &str| {
            f.channel(name)
                .ok_or_else(|| EnvError::config("instrument", format!("no {name} channel")))
        };
        let (h, hr) = (get("height")?, get("height_retrace")?);
        let n = self.cfg.pixels;
        self.img.clear();
        let mut line = Vec::with_capacity(n);
        let mut buf = Vec::with_capacity(n);
        for (a, b) in h.image.rows().into_iter().zip(hr.image.rows()) {
            line.clear();
            line.extend(a.iter().zip(b.iter()).map(|(x, y)| 0.5 * (x + y)));
            buf.clear();
            buf.extend(line.iter().copied());
            buf.sort_by(f32::total_cmp);
            let med = buf.get(buf.len() / 2).copied().unwrap_or(0.0);
            self.img.extend(line.iter().map(|v| v - med));
        }
        let s = self.inst.scan_settings();
        Ok(detect_atom(
            &self.img,
            n,
            s.pixel_size,
            s.center,
            self.cfg.detect_height,
        ))
    }

    fn distance(&self) -> f64 {
        (self.goal[0] - self.atom[0]).hypot(self.goal[1] - self.atom[1])
    }

    fn observe(&mut self, disp: [f64; 2]) -> Value {
        let c = self.cfg.obs_clip;
        let nm = |v: f64| ((v * 1e9).clamp(-c, c)) as f32;
        self.last_obs = [
            nm(self.goal[0] - self.atom[0]),
            nm(self.goal[1] - self.atom[1]),
            nm(disp[0]),
            nm(disp[1]),
        ];
        Value::Box(self.last_obs.to_vec())
    }

    fn record(&self, info: &mut Info) {
        let truth = self.inst.true_atoms_lab();
        let nearest = truth
            .iter()
            .min_by(|a, b| {
                let da = (a[0] - self.atom[0]).hypot(a[1] - self.atom[1]);
                let db = (b[0] - self.atom[0]).hypot(b[1] - self.atom[1]);
                da.total_cmp(&db)
            })
            .copied();
        info.insert(
            "atom_true".into(),
            InfoValue::F64s(nearest.map_or_else(Vec::new, |p| p.to_vec())),
        );
        info.insert(
            "true_distance".into(),
            InfoValue::F64(
                nearest.map_or(-1.0, |p| (p[0] - self.goal[0]).hypot(p[1] - self.goal[1])),
            ),
        );
        info.insert("atom_detected".into(), InfoValue::F64s(self.atom.to_vec()));
        info.insert("goal".into(), InfoValue::F64s(self.goal.to_vec()));
    }
}

impl<I: SpmInstrument + LateralManipulation + AtomTruth + NewEpisode + Send> Task
    for SpmAtomManipulation<I>
{
    fn observation_space(&self) -> Space {
        let c = self.cfg.obs_clip as f32;
        Space::uniform_box(&[4], -c, c)
    }

    fn action_space(&self) -> Space {
        let r = (self.cfg.reach * 1e9) as f32;
        Space::bounded_box(
            vec![-r, -r, -r, -r, 0.0, 0.1],
            vec![r, r, r, r, (MAX_BIAS * 1e3) as f32, MAX_CONDUCTANCE as f32],
        )
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.max_steps
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        self.inst.configure_scan(&self.settings())?;
        // Where the frame shows no atom (never on the simulator's defaults), the centre stands in.
        self.atom = self.scan_and_detect()?.unwrap_or([0.0, 0.0]);
        // The goal: a lattice vector n₁a₁ + n₂a₂ away, inside the frame.
        let mut rng = seeded(seed ^ 0x6174_6f6d_6d61_6e69);
        let a = self.cfg.lattice_constant;
        let [d0, d1] = self.cfg.goal_distance;
        let lim = 0.5 * self.cfg.field - 0.5e-9;
        let kmax = (d1 / (0.5 * a)).ceil() as i64 + 1;
        let mut goal = None;
        let mut fallback = self.atom;
        for _ in 0..1000 {
            let (n1, n2) = (
                rng.random_range(-kmax..=kmax) as f64,
                rng.random_range(-kmax..=kmax) as f64,
            );
            let v = [n1 * a + 0.5 * n2 * a, 0.5 * 3f64.sqrt() * n2 * a];
            let d = v[0].hypot(v[1]);
            let g = [self.atom[0] + v[0], self.atom[1] + v[1]];
            if d >= d0 && d <= d1 {
                fallback = g;
                if g[0].abs() <= lim && g[1].abs() <= lim {
                    goal = Some(g);
                    break;
                }
            }
        }
        self.goal = goal.unwrap_or(fallback);
        self.record(info);
        Ok(self.observe([0.0, 0.0]))
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let a = action
            .as_box()
            .ok_or_else(|| EnvError::action("action", "expected a Box value"))?;
        if a.len() != 6 {
            return Err(EnvError::action("action", "expected 6 values"));
        }
        let half = 0.5 * self.cfg.instrument.sample.size.get() * (1.0 - 1e-6);
        let at = |dx: f32, dy: f32| {
            [
                (self.atom[0] + f64::from(dx) * 1e-9).clamp(-half, half),
                (self.atom[1] + f64::from(dy) * 1e-9).clamp(-half, half),
            ]
        };
        let (start, end) = (at(a[0], a[1]), at(a[2], a[3]));
        let bias = f64::from(a[4]) * 1e-3;
        let conductance = f64::from(a[5]).max(1e-3) * 1e-6;
        self.inst.manipulate(start, end, bias, conductance)?;
        let before = self.distance();
        let mut reward = -1.0;
        let (obs, terminated) = match self.scan_and_detect()? {
            Some(p) => {
                let disp = [p[0] - self.atom[0], p[1] - self.atom[1]];
                self.atom = p;
                let after = self.distance();
                reward += (before - after) * 1e9;
                let success = after <= self.cfg.success_radius;
                if success {
                    reward += self.cfg.success_bonus;
                }
                info.insert("success".into(), InfoValue::Bool(success));
                info.insert("lost".into(), InfoValue::Bool(false));
                (self.observe(disp), success)
            }
            None => {
                reward -= self.cfg.lost_penalty;
                info.insert("success".into(), InfoValue::Bool(false));
                info.insert("lost".into(), InfoValue::Bool(true));
                (Value::Box(self.last_obs.to_vec()), true)
            }
        };
        self.record(info);
        Ok(TaskStep {
            obs,
            reward,
            terminated,
            success: info.get("success") == Some(&InfoValue::Bool(true)),
        })
    }

    fn render(&self) -> RgbImage {
        RgbImage::from_grey(&self.img, self.cfg.pixels, self.cfg.pixels)
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let o = obs.as_box().unwrap_or(&[0.0; 4]);
        let g = [f64::from(o[0]), f64::from(o[1])];
        let d = g[0].hypot(g[1]);
        let u = if d > 1e-6 {
            [g[0] / d, g[1] / d]
        } else {
            [1.0, 0.0]
        };
        let r = self.cfg.reach * 1e9;
        let len = d.min(r / u[0].abs().max(u[1].abs()).max(1e-6));
        let back = 0.05;
        Value::Box(vec![
            (-back * u[0]) as f32,
            (-back * u[1]) as f32,
            (len * u[0]) as f32,
            (len * u[1]) as f32,
            2.0,
            MAX_CONDUCTANCE as f32,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detector_finds_the_true_atom() {
        let mut task = SpmAtomManipulation::from_config(None).unwrap();
        for seed in 0..5 {
            let mut info = Info::new();
            task.reset(seed, &mut info).unwrap();
            let truth = task.inst.true_atoms_lab()[0];
            let err = (truth[0] - task.atom[0]).hypot(truth[1] - task.atom[1]);
            println!("seed {seed}: detection error {:.3} nm", err * 1e9);
            assert!(err < 0.1e-9, "seed {seed}: {err:e}");
            let goal_err = task.distance();
            assert!((0.5e-9 - 1e-12..=2.0e-9 + 1e-12).contains(&goal_err));
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        let v: toml::Value = toml::from_str("reach = -1.0").unwrap();
        let e = SpmAtomManipulation::from_config(Some(&v)).unwrap_err();
        assert!(e.to_string().contains("reach"), "{e}");
    }
}
