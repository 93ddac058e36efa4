"""The HDF5 files written by `scopegym simulate` read with h5py as documented."""

import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))


def simulate(tmp_path, scenario, seed, frames=2):
    png = tmp_path / f"f{seed}.png"
    h5 = tmp_path / f"f{seed}.h5"
    subprocess.run(
        [BIN, "simulate", str(ROOT / "scenarios" / scenario), "--out", str(png),
         "--hdf5", str(h5), "--seed", str(seed), "--frames", str(frames)],
        check=True, capture_output=True,
    )
    return h5


@pytest.mark.parametrize("scenario", ["stem_graphene_si.toml", "stem_mos2.toml", "stem_srtio3.toml"])
def test_layout_units_and_provenance(tmp_path, scenario):
    with h5py.File(simulate(tmp_path, scenario, 3), "r") as f:
        frame, noiseless = f["frame"], f["noiseless"]
        assert frame.dtype == np.float32 and frame.shape == (2, 256, 256)
        assert noiseless.shape == frame.shape
        for ds in (frame, noiseless):
            assert ds.attrs["units"] == "counts"
            assert len(ds.attrs["quantity"]) > 0
        pos, z = f["atoms/positions"][()], f["atoms/z"][()]
        assert pos.dtype == np.float64 and pos.shape[1] == 2 and pos.shape[0] == z.shape[0]
        assert z.dtype == np.int32 and z.min() >= 1
        assert f["atoms/positions"].attrs["units"] == "m"
        for key in ["beam_energy_eV", "convergence_angle_rad", "pixel_size_m", "dwell_time_s",
                    "beam_current_A", "haadf_exponent", "C10_m", "C12_m", "phi12_rad", "C30_m", "C50_m"]:
            assert np.isfinite(f.attrs[key]), key
        assert f.attrs["seed"] == 3
        assert "[optics]" in f.attrs["resolved_config"]
        assert f.attrs["scopegym_version"]
        # Frames are non-negative counts whose mean follows the expectation.
        data = frame[()]
        assert np.all(np.isfinite(data)) and data.min() >= 0
        exp = noiseless[()]
        assert abs(data.sum() - exp.sum()) < 5 * np.sqrt(exp.sum())


def test_same_seed_is_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with h5py.File(simulate(a, "stem_graphene_si.toml", 9), "r") as fa, \
            h5py.File(simulate(b, "stem_graphene_si.toml", 9), "r") as fb:
        for name in ["frame", "noiseless", "atoms/positions", "atoms/z"]:
            assert fa[name][()].tobytes() == fb[name][()].tobytes(), name


@pytest.mark.parametrize("scenario,main", [("afm_terraces.toml", "height"),
                                           ("stm_ag111_adatoms.toml", "height"),
                                           ("pfm_pto_film.toml", "phase")])
def test_spm_channels_and_truth(tmp_path, scenario, main):
    with h5py.File(simulate(tmp_path, scenario, 1, frames=1), "r") as f:
        frame = f["frame"]
        assert frame.dtype == np.float32 and frame.ndim == 3
        np.testing.assert_array_equal(frame[()], f[f"channels/{main}"][()])
        for name, ds in f["channels"].items():
            assert ds.shape == frame.shape, name
            assert ds.attrs["units"] in ("m", "deg", "a.u."), name
            assert np.all(np.isfinite(ds[()])), name
        assert f["truth/surface"].attrs["units"] == "m"
        tip = f["truth/tip"][()]
        assert tip.max() == 0.0 and tip.min() < 0.0
        assert f.attrs["instrument"] in ("afm", "stm", "pfm")


def test_pfm_spectroscopy_loop(tmp_path):
    h5 = tmp_path / "loop.h5"
    subprocess.run([BIN, "simulate", str(ROOT / "scenarios" / "pfm_pto_film.toml"),
                    "--spectroscopy", "1e-6,1e-6", "--hdf5", str(h5)],
                   check=True, capture_output=True)
    with h5py.File(h5, "r") as f:
        bias, resp = f["spectroscopy/bias"][()], f["spectroscopy/response"][()]
        assert f["spectroscopy/bias"].attrs["units"] == "V"
        assert bias.shape == resp.shape == (128,)
        # The steady (second) cycle switches up at positive and down at negative bias.
        b, r = bias[64:], resp[64:]
        up = b[1:][(r[:-1] <= 0) & (r[1:] > 0)]
        down = b[1:][(r[:-1] >= 0) & (r[1:] < 0)]
        assert len(up) and len(down)
        assert 3.6 < up[0] < 5.6 and -3.9 < down[0] < -1.9
