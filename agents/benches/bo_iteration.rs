//! One Bayesian-optimization iteration in 2-D: the GP fit warm-started from the previous fit's
//! hyperparameters (as in a running loop, with `BoConfig::default()`'s fit settings) plus LogEI
//! over a 50×50 grid, at n = 50, 100, 200, 400 observations of a smooth function with noise.
//!
//! `cargo bench -p scopegym-agents --bench bo_iteration`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::Rng;
use scopegym_agents::bo::BoConfig;
use scopegym_agents::gp::Gp;
use std::hint::black_box;

mod common;

/// Synthetic data: `sin(3x) cos(5y) + 0.5 x` plus Gaussian-ish noise of sd 0.05, seeded.
pub fn data(n: usize, seed: u64) -> (Vec<Vec<f64>>, Vec<f64>) {
    let mut rng = scopegym_envs::rng::seeded(seed);
    let x: Vec<Vec<f64>> = (0..n).map(|_| vec![rng.random(), rng.random()]).collect();
    let y = x
        .iter()
        .map(|p| {
            let noise: f64 = (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0;
            (3.0 * p[0]).sin() * (5.0 * p[1]).cos() + 0.5 * p[0] + 0.05 * noise
        })
        .collect();
    (x, y)
}

fn bench(c: &mut Criterion) {
    let bounds = [(0.0, 1.0), (0.0, 1.0)];
    let cfg = BoConfig::default().gp_config();
    let grid = common::grid();
    let mut group = c.benchmark_group("bo_iteration_2d_grid2500");
    group.sample_size(20);
    for n in [50usize, 100, 200, 400] {
        let (x, y) = data(n, 7);
        // The previous iteration's fit (on n − 1 points) provides the warm start.
        let prev = Gp::fit(&cfg, &bounds, &x[..n - 1], &y[..n - 1], None, 1).unwrap();
        let warm = prev.hyperparameters().clone();
        let mut buf = common::Buffers::default();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(common::iteration(&cfg, &x, &y, &warm, &grid, &mut buf).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
