//! Criterion benchmark: 100 TDGL steps of a 256×256 ferroelectric film (issue target: < 50 ms
//! on one core).

use criterion::{Criterion, criterion_group, criterion_main};
use scopegym::physics::spm::ferro::{FerroConfig, FerroFilm};
use std::hint::black_box;
use std::time::Duration;

fn tdgl(c: &mut Criterion) {
    let mut film = FerroFilm::new(&FerroConfig::default(), [256, 256], 1).expect("valid config");
    film.fill(-1.0);
    film.set_tip_field(128.0, 128.0, 4.0, 5.0);
    let mut g = c.benchmark_group("tdgl_256");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    g.bench_function("100_steps", |b| {
        b.iter(|| {
            film.run(100);
            black_box(film.polarization()[[128, 128]])
        })
    });
    g.finish();
}

criterion_group!(benches, tdgl);
criterion_main!(benches);
