"""The reference STEM gateway (drivers/python/stem_gateway.py): the protocol against a fake
backend on a thread (no scopegym build needed), and the simulator backend in a subprocess
(skipped when the installed scopegym lacks ``_native.StemSim``)."""

from __future__ import annotations

import importlib.util
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "drivers" / "python" / "stem_gateway.py"

_spec = importlib.util.spec_from_file_location("stem_gateway", SCRIPT)
assert _spec is not None and _spec.loader is not None
gw = importlib.util.module_from_spec(_spec)
sys.modules["stem_gateway"] = gw
_spec.loader.exec_module(gw)


class FakeBackend(gw.Backend):
    """A tiny deterministic STEM: a ramp image, a fixed spectrum."""

    def __init__(self) -> None:
        self.t = 0.0
        self.is_blanked = True
        self.pos = (0.0, 0.0)
        self.sc = {"rows": 3, "cols": 4, "pixel_size": 1e-10, "dwell_time": 1e-6, "flyback_time": 0.0, "center": (0.0, 0.0)}
        self.ab = {k: 0.0 for k in gw._ABERRATIONS}
        self.frames = 0
        self.safe_calls = 0
        self.hold = threading.Event()
        self.block_frames = False

    def info(self) -> dict[str, Any]:
        return {"name": "fake", "simulated": True}

    def clock(self) -> float:
        return self.t

    def beam_energy(self) -> float:
        return 60e3

    def beam_current(self) -> float:
        return 50e-12

    def scan(self) -> dict[str, Any]:
        return dict(self.sc)

    def configure_scan(self, scan: dict[str, Any]) -> dict[str, Any]:
        self.sc = dict(scan, dwell_time=max(scan["dwell_time"], 1e-6))  # clamps short dwells
        return dict(self.sc)

    def acquire_frame(self) -> tuple[np.ndarray, dict[str, Any]]:
        if self.is_blanked:
            raise gw.GatewayError(gw.REFUSED, "beam blanked")
        if self.block_frames:
            self.hold.wait(5.0)
        img = np.arange(self.sc["rows"] * self.sc["cols"], dtype=np.float32).reshape(self.sc["rows"], self.sc["cols"])
        meta = {"index": self.frames, "t_start": self.t, "duration": 1e-3, "electrons_per_pixel": 300.0, "dose": 3e22}
        self.frames += 1
        self.t += 1e-3
        return img, meta

    def probe_position(self) -> tuple[float, float]:
        return self.pos

    def move_probe(self, x: float, y: float) -> None:
        if abs(x) > 1e-6:
            raise gw.GatewayError(gw.INVALID_ARGUMENT, "outside the deflection range")
        self.pos = (x, y)

    def acquire_point(self, dwell_time: float) -> float:
        return 42.0 * dwell_time

    def acquire_spectrum(self, exposure: float) -> tuple[np.ndarray, np.ndarray]:
        return np.linspace(0.0, 10.0, 5), np.full(5, exposure, dtype=np.float32)

    def aberrations(self) -> dict[str, float]:
        return dict(self.ab)

    def set_aberrations(self, values: dict[str, float]) -> dict[str, float]:
        self.ab = {k: values.get(k, 0.0) for k in gw._ABERRATIONS}
        return dict(self.ab)

    def blanked(self) -> bool:
        return self.is_blanked

    def set_blanked(self, blanked: bool) -> None:
        self.is_blanked = blanked

    def make_safe(self) -> None:
        self.safe_calls += 1
        self.is_blanked = True


class Client:
    """A minimal protocol client for the tests."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.rfile = self.sock.makefile("rb")
        self.id = 0

    def raw(self, data: bytes) -> tuple[dict[str, Any], list[np.ndarray]] | None:
        self.sock.sendall(data)
        return gw.read_message(self.rfile)

    def call(self, method: str, **params: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
        self.id += 1
        msg = self.raw(gw.encode_message({"jsonrpc": "2.0", "id": self.id, "method": method, "params": params}))
        assert msg is not None
        h, att = msg
        assert h["id"] == self.id or "error" in h
        return h, att

    def result(self, method: str, **params: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
        h, att = self.call(method, **params)
        assert "result" in h, h
        return h["result"], att

    def error(self, method: str, **params: Any) -> dict[str, Any]:
        h, _ = self.call(method, **params)
        assert "error" in h, h
        return h["error"]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake():
    backend = FakeBackend()
    server = gw.serve(backend, port=0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield backend, server.server_address[1]
    server.shutdown()
    server.server_close()


def test_framing_round_trips_and_is_big_endian_then_little_endian_arrays():
    img = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = gw.encode_message({"id": 1, "result": {}}, [("image", img), ("energy", np.array([0.5, 1.5]))])
    (h,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4 : 4 + h])
    assert header["attachments"][0] == {"name": "image", "dtype": "<f4", "shape": [2, 3], "nbytes": 24}
    assert data[4 + h : 4 + h + 8] == np.array([0, 1], dtype="<f4").tobytes()
    import io

    back, arrays = gw.read_message(io.BytesIO(data))
    assert back == {"id": 1, "result": {}}
    np.testing.assert_array_equal(arrays[0], img)
    np.testing.assert_array_equal(arrays[1], [0.5, 1.5])
    assert arrays[1].dtype == np.dtype("<f8")


def test_read_message_refuses_declared_sizes_over_the_limit_and_truncation():
    import io

    with pytest.raises(gw.ProtocolError, match="too large"):
        gw.read_message(io.BytesIO(b"\xff\xff\xff\xf0"))
    h = json.dumps({"attachments": [{"name": "x", "dtype": "<f4", "shape": [10**6, 10**6], "nbytes": 4 * 10**12}]}).encode()
    with pytest.raises(gw.ProtocolError, match="too large"):
        gw.read_message(io.BytesIO(struct.pack(">I", len(h)) + h))
    full = gw.encode_message({"id": 1}, [("x", np.ones(4, dtype=np.float32))])
    with pytest.raises(gw.ProtocolError, match="truncated"):
        gw.read_message(io.BytesIO(full[:-2]))
    assert gw.read_message(io.BytesIO(b"")) is None


def test_every_method_over_a_socket(fake):
    backend, port = fake
    c = Client(port)
    info, _ = c.result("info")
    assert info["protocol"] == 1 and info["name"] == "fake" and info["simulated"] is True
    assert "acquire_frame" in info["methods"]
    status, _ = c.result("status")
    assert status["blanked"] is True and status["beam_energy"] == 60e3 and status["scan"]["rows"] == 3
    assert c.error("acquire_frame")["code"] == gw.REFUSED
    assert c.result("set_blanked", blanked=False)[0] == {"blanked": False}
    assert c.result("get_blanked")[0] == {"blanked": False}
    acc, _ = c.result("configure_scan", rows=2, cols=5, pixel_size=2e-10, dwell_time=1e-7, flyback_time=0.0, center=[0.0, 0.0])
    assert acc["dwell_time"] == 1e-6 and acc["cols"] == 5, "returns what was accepted"
    assert c.result("get_scan")[0] == acc
    res, att = c.result("acquire_frame")
    assert res["meta"]["index"] == 0 and res["meta"]["dose"] == 3e22
    assert att[0].shape == (2, 5) and att[0].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(att[0].ravel(), np.arange(10))
    assert c.result("clock")[0] == {"clock": 1e-3}
    assert c.result("set_probe_position", position=[1e-9, -2e-9])[0] == {"position": [1e-9, -2e-9]}
    assert c.result("get_probe_position")[0] == {"position": [1e-9, -2e-9]}
    assert c.error("set_probe_position", position=[1.0, 0.0])["code"] == gw.INVALID_ARGUMENT
    assert c.result("acquire_point", dwell_time=0.5)[0] == {"counts": 21.0}
    res, (energy, counts) = c.result("acquire_spectrum", exposure=0.25)
    assert res == {} and energy.dtype == np.dtype("<f8") and counts.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(counts, np.full(5, 0.25, dtype=np.float32))
    ab, _ = c.result("set_aberrations", c10=2e-9, c12=1e-9)
    assert ab["c10"] == 2e-9 and ab["c50"] == 0.0 and set(ab) == set(gw._ABERRATIONS)
    assert c.result("get_aberrations")[0] == ab
    assert c.error("set_aberrations", c99=1.0)["code"] == gw.INVALID_PARAMS
    # All 25 coefficients, C32 … C56 included, non-zero and back unchanged.
    every = {k: (0.1 if k.startswith("phi") else 1e-9) * (i + 1) for i, k in enumerate(gw._ABERRATIONS)}
    assert len(every) == 25
    assert c.result("set_aberrations", **every)[0] == every
    assert c.result("get_aberrations")[0] == every
    assert c.error("start_episode", seed=3)["code"] == gw.UNSUPPORTED
    assert c.result("make_safe")[0] == {"blanked": True}
    assert backend.safe_calls == 1
    c.close()


def test_error_codes_for_bad_requests(fake):
    _, port = fake
    c = Client(port)
    assert c.error("no_such_method")["code"] == gw.METHOD_NOT_FOUND
    assert c.error("acquire_point", dwell_time="long")["code"] == gw.INVALID_PARAMS
    assert c.error("set_blanked", blanked=1)["code"] == gw.INVALID_PARAMS
    assert c.error("configure_scan", rows=-1)["code"] == gw.INVALID_PARAMS
    h, _ = c.raw(gw.encode_message({"jsonrpc": "2.0", "method": "info"}))
    assert h["error"]["code"] == gw.INVALID_REQUEST and h["id"] is None
    # Garbage: a parse error, then the connection closes.
    h, _ = c.raw(struct.pack(">I", 9) + b"{garbage}")
    assert h["error"]["code"] == gw.PARSE_ERROR
    assert gw.read_message(c.rfile) is None
    # A declared header of 4 GiB: refused from the length alone, then closed.
    c = Client(port)
    h, _ = c.raw(b"\xff\xff\xff\xf0")
    assert h["error"]["code"] == gw.TOO_LARGE
    assert gw.read_message(c.rfile) is None


def test_make_safe_on_a_fresh_connection_does_not_wait_for_a_hung_acquisition(fake):
    backend, port = fake
    backend.is_blanked = False
    backend.block_frames = True
    busy = Client(port)
    busy.sock.sendall(gw.encode_message({"jsonrpc": "2.0", "id": 1, "method": "acquire_frame", "params": {}}))
    time.sleep(0.2)  # the acquisition now holds the gateway's lock
    t0 = time.monotonic()
    safe = Client(port)
    assert safe.result("make_safe")[0] == {"blanked": True}
    assert time.monotonic() - t0 < 3.0
    assert backend.safe_calls == 1
    backend.hold.set()
    busy.close()
    safe.close()


def _has_stem_sim() -> bool:
    try:
        from scopegym import _native
    except ImportError:
        return False
    return hasattr(_native, "StemSim")


@pytest.mark.skipif(not _has_stem_sim(), reason="the installed scopegym has no _native.StemSim (rebuild the package)")
def test_the_simulator_gateway_in_a_subprocess_matches_the_simulator():
    from scopegym import _native

    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--task", "scopegym/StemAutofocus-v2", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        c = Client(port)
        info, _ = c.result("info")
        assert info["protocol"] == 1 and info["simulated"] is True
        direct = _native.StemSim("scopegym/StemAutofocus-v2")
        params, _ = c.result("start_episode", seed=4)
        assert params["params"] == direct.start_episode(4) and params["params"]
        c.result("set_blanked", blanked=False)
        direct.set_blanked(False)
        ab, _ = c.result("set_aberrations", c10=3e-9, c30=123e-9)
        assert ab == direct.set_aberrations({"c10": 3e-9, "c30": 123e-9})
        res, (img,) = c.result("acquire_frame")
        want, meta = direct.acquire_frame()
        np.testing.assert_array_equal(img, want)
        assert res["meta"] == meta
        err = c.error("set_probe_position", position=[1.0, 0.0])
        assert err["code"] == gw.INVALID_ARGUMENT, err
        c.result("make_safe")
        assert c.error("acquire_frame")["code"] == gw.REFUSED
        c.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
