//! The BO iteration that the criterion bench (`benches/bo_iteration.rs`) and the BoTorch
//! comparison (`examples/bo_speed.rs`, run by `benches/python/bench_bo.py`) both time, so that
//! both measure the same work.

use scopegym_agents::Result;
use scopegym_agents::acquisition::log_expected_improvement;
use scopegym_agents::gp::{Gp, GpConfig, Hyperparameters, PredictWorkspace};

/// The candidates: the 50×50 grid of the unit square.
pub fn grid() -> Vec<Vec<f64>> {
    (0..50 * 50)
        .map(|i| vec![(i % 50) as f64 / 49.0, (i / 50) as f64 / 49.0])
        .collect()
}

/// Buffers reused across iterations.
#[derive(Debug, Default)]
pub struct Buffers {
    ws: PredictWorkspace,
    mu: Vec<f64>,
    var: Vec<f64>,
}

/// One iteration on `(x, y)` in the unit square: the GP fit warm-started from `warm`, then LogEI
/// over `grid`; returns the best LogEI.
pub fn iteration(
    cfg: &GpConfig,
    x: &[Vec<f64>],
    y: &[f64],
    warm: &Hyperparameters,
    grid: &[Vec<f64>],
    buf: &mut Buffers,
) -> Result<f64> {
    let gp = Gp::fit(cfg, &[(0.0, 1.0), (0.0, 1.0)], x, y, Some(warm), 2)?;
    gp.predict_into(grid, &mut buf.ws, &mut buf.mu, &mut buf.var);
    let best = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(buf
        .mu
        .iter()
        .zip(&buf.var)
        .map(|(m, v)| log_expected_improvement(*m, v.sqrt(), best, 0.0))
        .fold(f64::NEG_INFINITY, f64::max))
}
