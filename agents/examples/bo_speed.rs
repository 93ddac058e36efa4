//! One Bayesian-optimization iteration in 2-D, timed on data from a JSON file, for the
//! side-by-side comparison with BoTorch (`benches/python/bench_bo.py` writes the data and runs
//! this): the GP fit warm-started from a fit on the first `n − 1` points (as in a running loop,
//! with `BoConfig::default()`'s fit settings), then LogEI over the 50×50 grid of the unit square.
//!
//! `bo_speed <data.json> [repeats]`; the file is `{"<n>": {"x": [[x0, x1], ...], "y": [...]}}`.
//! Prints `{"<n>": median milliseconds}` as JSON.

use scopegym_agents::bo::BoConfig;
use scopegym_agents::gp::Gp;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

#[path = "../benches/common/mod.rs"]
mod common;

#[derive(serde::Deserialize)]
struct Data {
    x: Vec<Vec<f64>>,
    y: Vec<f64>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: bo_speed <data.json> [repeats]")?;
    let repeats: usize = args.next().map_or(Ok(20), |s| s.parse())?;
    let sets: BTreeMap<String, Data> = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let bounds = [(0.0, 1.0), (0.0, 1.0)];
    let cfg = BoConfig::default().gp_config();
    let grid = common::grid();
    let mut out = BTreeMap::new();
    for (name, d) in &sets {
        let n = d.y.len();
        let prev = Gp::fit(&cfg, &bounds, &d.x[..n - 1], &d.y[..n - 1], None, 1)?;
        let warm = prev.hyperparameters().clone();
        let mut buf = common::Buffers::default();
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let t = Instant::now();
            black_box(common::iteration(&cfg, &d.x, &d.y, &warm, &grid, &mut buf)?);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        out.insert(name.clone(), times[times.len() / 2]);
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
