//! End-to-end checks of `scopegym simulate`: outputs, determinism, and errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_scopegym"))
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("runs")
}

/// `scopegym simulate <scenario> --out <png> [--hdf5 <h5>] [extra...]`.
fn simulate(scenario: &Path, png: &Path, h5: Option<&Path>, extra: &[&str]) -> Output {
    let mut args = vec![
        "simulate",
        scenario.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ];
    if let Some(h) = h5 {
        args.extend(["--hdf5", h.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

/// A small, fast scenario written to `dir`.
fn small_scenario(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("small.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"small\"\ninstrument = \"stem\"\n[specimen]\ncrystal = \"graphene\"\ndopants = [{{ element = \"Si\" }}]\n[scan]\npixels = [48, 64]\n[drift]\nspeed = {{ uniform = [\"0.1 nm/min\", \"1 nm/min\"] }}\n{extra}"
        ),
    )
    .unwrap();
    p
}

fn read_f32(file: &hdf5::File, name: &str) -> Vec<f32> {
    file.dataset(name).unwrap().read_raw::<f32>().unwrap()
}

#[test]
fn writes_png_and_hdf5_with_the_documented_layout() {
    let dir = tempfile::tempdir().unwrap();
    let sc = small_scenario(dir.path(), "");
    let png = dir.path().join("f.png");
    let h5 = dir.path().join("f.h5");
    let out = simulate(&sc, &png, Some(&h5), &["--frames", "3", "--seed", "7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap();
    assert_eq!(img.height(), 48);
    assert_eq!(img.width(), 3 * 64 + 2 * 2);
    let f = hdf5::File::open(&h5).unwrap();
    let frame = f.dataset("frame").unwrap();
    assert_eq!(frame.shape(), vec![3, 48, 64]);
    assert_eq!(f.dataset("noiseless").unwrap().shape(), vec![3, 48, 64]);
    let units: hdf5::types::VarLenUnicode = frame.attr("units").unwrap().read_scalar().unwrap();
    assert_eq!(units.as_str(), "counts");
    assert!(frame.attr("quantity").is_ok());
    let pos = f.dataset("atoms/positions").unwrap();
    assert_eq!(pos.shape()[1], 2);
    let z = f.dataset("atoms/z").unwrap().read_raw::<i32>().unwrap();
    assert_eq!(z.len(), pos.shape()[0]);
    assert_eq!(z.iter().filter(|&&v| v == 14).count(), 1);
    for a in [
        "beam_energy_eV",
        "convergence_angle_rad",
        "pixel_size_m",
        "dwell_time_s",
        "beam_current_A",
        "haadf_exponent",
        "C10_m",
        "C12_m",
        "phi12_rad",
        "C30_m",
        "C50_m",
    ] {
        let v: f64 = f
            .attr(a)
            .unwrap_or_else(|_| panic!("missing {a}"))
            .read_scalar()
            .unwrap();
        assert!(v.is_finite(), "{a}");
    }
    let e: f64 = f.attr("beam_energy_eV").unwrap().read_scalar().unwrap();
    assert_eq!(e, 60e3);
    let seed: u64 = f.attr("seed").unwrap().read_scalar().unwrap();
    assert_eq!(seed, 7);
    let cfg: hdf5::types::VarLenUnicode = f.attr("resolved_config").unwrap().read_scalar().unwrap();
    assert!(cfg.as_str().contains("[optics]"));
    // Noisy frames average to the noiseless expectation.
    let (a, b) = (read_f32(&f, "frame"), read_f32(&f, "noiseless"));
    let (sa, sb) = (
        a.iter().map(|&v| f64::from(v)).sum::<f64>(),
        b.iter().map(|&v| f64::from(v)).sum::<f64>(),
    );
    assert!((sa - sb).abs() < 5.0 * sb.sqrt(), "{sa} vs {sb}");
    // Atom positions are in frame coordinates: the Si dopant sits near the frame centre.
    let p = pos.read_2d::<f64>().unwrap();
    let si = z.iter().position(|&v| v == 14).unwrap();
    let (x, y) = (p[[si, 0]], p[[si, 1]]);
    assert!(
        (x - 32.0 * 0.2e-10).abs() < 2e-10 && (y - 24.0 * 0.2e-10).abs() < 2e-10,
        "({x}, {y})"
    );
}

#[test]
fn same_seed_gives_identical_datasets_and_different_seeds_differ() {
    let dir = tempfile::tempdir().unwrap();
    let sc = small_scenario(dir.path(), "");
    let mut files = Vec::new();
    for (k, seed) in ["5", "5", "6"].iter().enumerate() {
        let h5 = dir.path().join(format!("{k}.h5"));
        let png = dir.path().join(format!("{k}.png"));
        let out = simulate(&sc, &png, Some(&h5), &["--frames", "2", "--seed", seed]);
        assert!(out.status.success());
        files.push(hdf5::File::open(&h5).unwrap());
    }
    for name in ["frame", "noiseless"] {
        let (a, b) = (read_f32(&files[0], name), read_f32(&files[1], name));
        let c = read_f32(&files[2], name);
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(bytes(&a), bytes(&b), "{name}");
        assert_ne!(bytes(&a), bytes(&c), "{name}");
    }
    let pa = files[0]
        .dataset("atoms/positions")
        .unwrap()
        .read_raw::<f64>()
        .unwrap();
    let pb = files[1]
        .dataset("atoms/positions")
        .unwrap()
        .read_raw::<f64>()
        .unwrap();
    assert_eq!(pa, pb);
}

fn assert_input_error(scenario_text: &str, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sc = dir.path().join("bad.toml");
    std::fs::write(&sc, scenario_text).unwrap();
    let png = dir.path().join("o.png");
    let h5 = dir.path().join("o.h5");
    let out = simulate(&sc, &png, Some(&h5), &[]);
    assert_eq!(out.status.code(), Some(2), "{scenario_text}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains(needle), "{needle} not in {err}");
    assert!(!png.exists() && !h5.exists(), "nothing must be written");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn bad_input_gives_one_line_and_exit_code_2_and_writes_nothing() {
    assert_input_error(
        "[optics]\nconvergence_angel = \"30 mrad\"\n",
        "convergence_angel",
    );
    assert_input_error("[optics]\nenergy = \"60 nm\"\n", "optics.energy");
    assert_input_error("[scan]\ndose = \"-1e4 e/Å²\"\n", "scan.dose");
    assert_input_error("[scan]\ndwell_time = \"4 furlongs\"\n", "scan.dwell_time");
    assert_input_error("[specimen]\ncrystal = \"diamond\"\n", "specimen.crystal");
    assert_input_error(
        "[detector]\nhaadf_exponent = 9\n",
        "detector.haadf_exponent",
    );
    assert_input_error(
        "[beam]\ncurrent = { uniform = [\"2 pA\", \"1 pA\"] }\n",
        "beam.current",
    );
}

#[test]
fn missing_file_and_bad_arguments_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("o.png");
    let out = simulate(Path::new("/nonexistent/scenario.toml"), &png, None, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/scenario.toml"), "{err}");
    let sc = repo("scenarios/stem_graphene_si.toml");
    let out = simulate(&sc, Path::new("/nonexistent/dir/o.png"), None, &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = simulate(&sc, &png, None, &["--frames", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!png.exists());
}

#[test]
fn shipped_scenarios_load_and_simulate() {
    for name in [
        "stem_graphene_si",
        "stem_mos2",
        "stem_srtio3",
        "afm_terraces",
        "pfm_pto_film",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("o.png");
        let sc = repo(&format!("scenarios/{name}.toml"));
        let out = simulate(&sc, &png, None, &["--seed", "3"]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let img = image::open(&png).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (256, 256));
        // Not blank: atoms give contrast.
        let (mn, mx) = img
            .pixels()
            .fold((255u8, 0u8), |(a, b), p| (a.min(p[0]), b.max(p[0])));
        assert!(mx > mn + 100, "{name}: contrast {mn}..{mx}");
    }
}

fn attr_str(ds: &hdf5::Dataset, name: &str) -> String {
    let v: hdf5::types::VarLenUnicode = ds.attr(name).unwrap().read_scalar().unwrap();
    v.to_string()
}

#[test]
fn spm_scenarios_write_channels_and_ground_truth() {
    for (name, main, extra) in [
        ("afm_terraces", "height", vec![]),
        ("stm_ag111_adatoms", "height", vec!["truth/adatoms"]),
        (
            "pfm_pto_film",
            "phase",
            vec!["truth/polarization", "channels/amplitude"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("o.png");
        let h5 = dir.path().join("o.h5");
        let out = simulate(
            &repo(&format!("scenarios/{name}.toml")),
            &png,
            Some(&h5),
            &[],
        );
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(png.exists());
        let f = hdf5::File::open(&h5).unwrap();
        let frame = f.dataset("frame").unwrap();
        let (rows, cols) = (frame.shape()[1], frame.shape()[2]);
        assert_eq!(frame.shape()[0], 1);
        assert!(attr_str(&frame, "quantity").starts_with(main), "{name}");
        assert_eq!(f.dataset("noiseless").unwrap().shape(), frame.shape());
        for ch in ["height", "height_retrace", "error"] {
            let ds = f.dataset(&format!("channels/{ch}")).unwrap();
            assert_eq!(ds.shape(), vec![1, rows, cols], "{name}/{ch}");
            assert_eq!(attr_str(&ds, "units"), "m", "{name}/{ch}");
            assert!(!attr_str(&ds, "quantity").is_empty());
            assert!(
                read_f32(&f, &format!("channels/{ch}"))
                    .iter()
                    .all(|v| v.is_finite())
            );
        }
        // The main channel is /frame.
        assert_eq!(
            read_f32(&f, "frame"),
            read_f32(&f, &format!("channels/{main}"))
        );
        let surface = f.dataset("truth/surface").unwrap();
        assert_eq!(attr_str(&surface, "units"), "m");
        assert_eq!(surface.shape().len(), 2);
        let tip = read_f32(&f, "truth/tip");
        assert!(
            tip.iter().all(|&t| t <= 0.0) && tip.contains(&0.0),
            "{name}: tip apex at 0"
        );
        for path in extra {
            assert!(f.dataset(path).is_ok(), "{name}: {path} missing");
        }
        if name == "pfm_pto_film" {
            let ds = f.dataset("channels/phase").unwrap();
            assert_eq!(attr_str(&ds, "units"), "deg");
            let p = read_f32(&f, "truth/polarization");
            assert!(p.iter().all(|v| (-1.0..=1.0).contains(v)));
        }
    }
}

#[test]
fn pfm_spectroscopy_writes_a_hysteresis_loop() {
    let dir = tempfile::tempdir().unwrap();
    let h5 = dir.path().join("loop.h5");
    let sc = dir.path().join("pfm.toml");
    // The shipped film on a smaller grid (the loop is local; the frame is not the point here).
    let text = std::fs::read_to_string(repo("scenarios/pfm_pto_film.toml"))
        .unwrap()
        .replace("pixels = [256, 256]", "pixels = [32, 32]");
    std::fs::write(&sc, text).unwrap();
    let out = run(&[
        "simulate",
        sc.to_str().unwrap(),
        "--spectroscopy",
        "5e-7,8e-7",
        "--hdf5",
        h5.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("coercive"), "{stderr}");
    let f = hdf5::File::open(&h5).unwrap();
    let (bias_ds, resp_ds) = (
        f.dataset("spectroscopy/bias").unwrap(),
        f.dataset("spectroscopy/response").unwrap(),
    );
    assert_eq!(attr_str(&bias_ds, "units"), "V");
    assert!(!attr_str(&resp_ds, "units").is_empty());
    let bias: Vec<f64> = bias_ds.read_raw().unwrap();
    let resp: Vec<f64> = resp_ds.read_raw().unwrap();
    assert_eq!(bias.len(), resp.len());
    assert_eq!(bias.len(), 128, "two cycles of 64 points");
    assert!((bias.iter().cloned().fold(f64::MIN, f64::max) - 8.5).abs() < 1e-9);
    // A loop: the response is positive at +8.5 V and negative at -8.5 V.
    let at = |v: f64| {
        bias.iter()
            .zip(&resp)
            .skip(64)
            .find(|(b, _)| (*b - v).abs() < 1e-9)
            .map(|(_, r)| *r)
            .unwrap()
    };
    assert!(at(8.5) > 0.5 && at(-8.5) < -0.5, "{} {}", at(8.5), at(-8.5));
}

#[test]
fn spectroscopy_needs_pfm_and_a_valid_point() {
    let dir = tempfile::tempdir().unwrap();
    let h5 = dir.path().join("x.h5");
    for (scenario, point, needle) in [
        ("afm_terraces", "1e-7,1e-7", "PFM"),
        ("pfm_pto_film", "1e-7", "X,Y"),
        ("pfm_pto_film", "1e-7,nan", "X,Y"),
        ("pfm_pto_film", "1e-7,5e-6", "scanner range"),
    ] {
        let out = run(&[
            "simulate",
            repo(&format!("scenarios/{scenario}.toml"))
                .to_str()
                .unwrap(),
            "--spectroscopy",
            point,
            "--hdf5",
            h5.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{scenario} {point}: {stderr}");
        assert!(stderr.contains(needle), "{scenario} {point}: {stderr}");
        assert!(!h5.exists(), "nothing written on error");
    }
}
