//! Criterion benchmark: the SPM z feedback over one 256-pixel line (trace and retrace) at the
//! defaults (2 kHz, 1 s per trace: ≈ 7.8 controller samples per pixel, ≈ 2000 per pass),
//! per-sample loop against the closed-form path (`ZFeedback::set_closed_form`, used by
//! `fidelity = "fast"`).
//!
//! - `spm_feedback_line_256/per_sample`: the velocity-form PI law sample by sample.
//! - `spm_feedback_line_256/closed_form`: runs of samples along the profile's linear pieces in
//!   closed form where no limit acts.
//!
//! - `spm_feedback_line_40/one_pass`: a 40-pixel line at 2.5 samples per pixel (the
//!   atom-manipulation task's frame: 10 lines/s), where the closed-form path runs each line in
//!   one pass ([`ZFeedback::set_closed_form`]).
//!
//! The profile: 0.39 nm terraces every 32 pixels with 20 pm of pixel-to-pixel roughness.

use criterion::{Criterion, criterion_group, criterion_main};
use scopegym_physics::spm::feedback::{FeedbackConfig, ZFeedback};
use std::hint::black_box;
use std::time::Duration;

/// `n` pixels of the benchmark profile: terraces and roughness (module docs), m.
fn terraces(n: usize) -> Vec<f32> {
    (0..n)
        .map(|j| (j / 32) as f32 * 0.39e-9 + 20e-12 * ((j as f32) * 2.3).sin())
        .collect()
}

/// Group `spm_feedback_line_<n>`: trace and retrace of an `n`-pixel line at `pixel_time` (s)
/// per pixel, one benchmark per `(name, closed-form path on)` case.
fn lines(c: &mut Criterion, n: usize, pixel_time: f64, cases: &[(&str, bool)]) {
    let profile = terraces(n);
    let (mut h, mut e) = (vec![0f32; n], vec![0f32; n]);
    let mut g = c.benchmark_group(format!("spm_feedback_line_{n}"));
    g.sample_size(50).measurement_time(Duration::from_secs(4));
    for &(name, closed) in cases {
        let mut fb = ZFeedback::new(&FeedbackConfig::default()).expect("defaults");
        fb.set_closed_form(closed);
        fb.engage(0.0);
        let mut covered = (0, 0);
        for rev in [false, true] {
            let st = fb
                .scan_line(&profile, pixel_time, rev, &mut h, &mut e)
                .unwrap();
            covered.0 += st.closed_form_samples;
            covered.1 += st.samples;
        }
        eprintln!(
            "{n} pixels, {name}: {} of {} samples in closed form",
            covered.0, covered.1
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                for rev in [false, true] {
                    let st = fb
                        .scan_line(black_box(&profile), pixel_time, rev, &mut h, &mut e)
                        .unwrap();
                    black_box(st.rms_error);
                }
            })
        });
    }
    g.finish();
}

fn line(c: &mut Criterion) {
    lines(
        c,
        256,
        1.0 / 256.0,
        &[("per_sample", false), ("closed_form", true)],
    );
}

/// 2.5 samples per pixel at the default 2 kHz.
fn short_line(c: &mut Criterion) {
    lines(c, 40, 2.5 / 2e3, &[("one_pass", true)]);
}

criterion_group!(benches, line, short_line);
criterion_main!(benches);
