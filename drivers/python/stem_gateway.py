#!/usr/bin/env python3
"""The reference STEM gateway: serves a STEM over scopegym's gateway protocol
(``drivers/STEM_GATEWAY.md``, version 1) to ``StemGatewayClient``.

Run it over the scopegym simulator of a task::

    python drivers/python/stem_gateway.py --task scopegym/StemAutofocus-v2 --port 0

(the first stdout line is the bound port), or over a lab's own backend::

    python drivers/python/stem_gateway.py --backend mylab_shim:MyBackend --port 7001

A lab writes a :class:`Backend` subclass over its vendor API (a short shim: each method is a
call or two, converted to SI units); everything else here (framing, size limits, error codes,
one thread per connection) stays as it is. Standard library plus NumPy; the simulator backend
needs the ``scopegym`` package.
"""

from __future__ import annotations

import argparse
import importlib
import json
import socket
import socketserver
import struct
import sys
import threading
from typing import Any, Callable

import numpy as np

PROTOCOL_VERSION = 1
MAX_HEADER = 1 << 20
DEFAULT_MAX_MESSAGE = 128 << 20

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
REFUSED = -32000
INVALID_ARGUMENT = -32001
UNSUPPORTED = -32002
INSTRUMENT_FAULT = -32003
TOO_LARGE = -32004

_DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8")}
# The aberration keys (scopegym's ``Aberrations::NAMES``): the first nine since protocol 1, then
# the non-round terms C32 … C56 (a missing key in a request is 0).
_ABERRATIONS = (
    "c10", "c12", "phi12", "c21", "phi21", "c23", "phi23", "c30", "c50",
    "c32", "phi32", "c34", "phi34", "c41", "phi41", "c43", "phi43",
    "c45", "phi45", "c52", "phi52", "c54", "phi54", "c56", "phi56",
)  # fmt: skip
_SCAN = ("rows", "cols", "pixel_size", "dwell_time", "flyback_time", "center")


class GatewayError(Exception):
    """An error reply: ``code`` from the spec's table, ``message`` for the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProtocolError(Exception):
    """The peer broke the framing; the connection is closed."""


# --------------------------------------------------------------------------------------------
# Framing


def _read_exact(rfile: Any, n: int, part: str) -> bytes:
    """Reads ``n`` bytes in chunks as they arrive (never reserving ``n`` up front)."""
    chunks = []
    got = 0
    while got < n:
        b = rfile.read(min(n - got, 1 << 16))
        if not b:
            raise ProtocolError(f"truncated message: connection closed after {got} of {n} bytes of the {part}")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_message(rfile: Any, max_message: int = DEFAULT_MAX_MESSAGE) -> tuple[dict[str, Any], list[np.ndarray]] | None:
    """One message as ``(header, arrays)``; ``None`` when the peer closed between messages."""
    first = rfile.read(4)
    if not first:
        return None
    if len(first) < 4:
        first += _read_exact(rfile, 4 - len(first), "length")
    (h,) = struct.unpack(">I", first)
    if h == 0:
        raise ProtocolError("header length 0")
    if h > MAX_HEADER or 4 + h > max_message:
        raise ProtocolError(f"message too large: declared header of {h} bytes exceeds the limit")
    try:
        header = json.loads(_read_exact(rfile, h, "header").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    descs = header.pop("attachments", None) or []
    if not isinstance(descs, list):
        raise ProtocolError("`attachments` is not a list")
    total = 4 + h
    parsed = []
    for i, d in enumerate(descs):
        try:
            dtype = _DTYPES[d["dtype"]]
            shape = tuple(int(s) for s in d["shape"])
            nbytes = int(d["nbytes"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"attachment {i}: needs name, dtype <f4/<f8, shape, nbytes") from None
        if any(s < 0 for s in shape) or nbytes != int(np.prod(shape, dtype=object)) * dtype.itemsize:
            raise ProtocolError(f"attachment {i}: nbytes {nbytes} does not match shape {shape}")
        total += nbytes
        parsed.append((dtype, shape, nbytes))
    if total > max_message:
        raise ProtocolError(f"message too large: {total} bytes exceeds the limit of {max_message}")
    arrays = [
        np.frombuffer(_read_exact(rfile, n, f"attachment {i}"), dtype=dt).reshape(shape)
        for i, (dt, shape, n) in enumerate(parsed)
    ]
    return header, arrays


def encode_message(header: dict[str, Any], attachments: list[tuple[str, np.ndarray]] = ()) -> bytes:
    """The bytes of one message; each attachment is sent little-endian, C order."""
    header = dict(header)
    blobs = []
    if attachments:
        descs = []
        for name, a in attachments:
            dt = "<f8" if a.dtype == np.float64 else "<f4"
            a = np.ascontiguousarray(a, dtype=dt)
            descs.append({"name": name, "dtype": dt, "shape": list(a.shape), "nbytes": a.nbytes})
            blobs.append(a.tobytes())
        header["attachments"] = descs
    body = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_HEADER:
        raise GatewayError(TOO_LARGE, f"reply header of {len(body)} bytes exceeds {MAX_HEADER}")
    return struct.pack(">I", len(body)) + body + b"".join(blobs)


# --------------------------------------------------------------------------------------------
# Backends


class Backend:
    """What a gateway serves. A lab subclasses it over its vendor API; all values SI.

    Raise :class:`GatewayError` (``REFUSED``, ``INVALID_ARGUMENT``, ``INSTRUMENT_FAULT``) for
    the instrument's own refusals and faults. ``make_safe`` must work while another thread is
    inside an acquisition (it is called from a separate connection).
    """

    #: Set to True when the backend serializes its calls itself (then the gateway takes no lock).
    thread_safe = False

    def info(self) -> dict[str, Any]:
        """``{"name": str, "simulated": bool}``."""
        raise NotImplementedError

    def clock(self) -> float:
        raise NotImplementedError

    def beam_energy(self) -> float:
        raise NotImplementedError

    def beam_current(self) -> float:
        raise NotImplementedError

    def scan(self) -> dict[str, Any]:
        """The scan in force: rows, cols, pixel_size, dwell_time, flyback_time, center."""
        raise NotImplementedError

    def configure_scan(self, scan: dict[str, Any]) -> dict[str, Any]:
        """Requests ``scan``; returns what was accepted."""
        raise NotImplementedError

    def acquire_frame(self) -> tuple[np.ndarray, dict[str, Any]]:
        """``(float32 image (rows, cols), meta)``; meta: index, t_start, duration,
        electrons_per_pixel, dose (e⁻/m²)."""
        raise NotImplementedError

    def probe_position(self) -> tuple[float, float]:
        raise NotImplementedError

    def move_probe(self, x: float, y: float) -> None:
        raise NotImplementedError

    def acquire_point(self, dwell_time: float) -> float:
        raise NotImplementedError

    def acquire_spectrum(self, exposure: float) -> tuple[np.ndarray, np.ndarray]:
        """``(energy float64 eV, counts float32)``."""
        raise NotImplementedError

    def aberrations(self) -> dict[str, float]:
        raise NotImplementedError

    def set_aberrations(self, values: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def blanked(self) -> bool:
        raise NotImplementedError

    def set_blanked(self, blanked: bool) -> None:
        raise NotImplementedError

    def make_safe(self) -> None:
        self.set_blanked(True)

    def start_episode(self, seed: int) -> dict[str, float]:
        """Optional: a simulator reseeds; a lab may move to a fresh area."""
        raise GatewayError(UNSUPPORTED, "start_episode is not supported by this instrument")


class SimulatorBackend(Backend):
    """The simulator of a scopegym STEM task, through ``scopegym._native.StemSim``."""

    def __init__(self, task: str, config_json: str | None = None, scenario: str | None = None) -> None:
        from scopegym import _native

        self._errors = importlib.import_module("scopegym._errors")
        self.sim = _native.StemSim(task, config_json, scenario)

    def _call(self, f: Callable[..., Any], *args: Any) -> Any:
        try:
            return f(*args)
        except self._errors.PhysicsError as e:
            kind = getattr(e, "kind", "")
            code = REFUSED if kind == "refused" else INVALID_ARGUMENT
            raise GatewayError(code, str(e)) from None

    def info(self) -> dict[str, Any]:
        name, simulated = self.sim.info()
        return {"name": name, "simulated": simulated}

    def clock(self) -> float:
        return self.sim.clock()

    def beam_energy(self) -> float:
        return self.sim.beam_energy()

    def beam_current(self) -> float:
        return self.sim.beam_current()

    def scan(self) -> dict[str, Any]:
        return self.sim.scan()

    def configure_scan(self, scan: dict[str, Any]) -> dict[str, Any]:
        s = scan
        return self._call(
            self.sim.configure_scan, s["rows"], s["cols"], s["pixel_size"], s["dwell_time"], s["flyback_time"], tuple(s["center"])
        )

    def acquire_frame(self) -> tuple[np.ndarray, dict[str, Any]]:
        return self._call(self.sim.acquire_frame)

    def probe_position(self) -> tuple[float, float]:
        return self.sim.probe_position()

    def move_probe(self, x: float, y: float) -> None:
        self._call(self.sim.move_probe, x, y)

    def acquire_point(self, dwell_time: float) -> float:
        return self._call(self.sim.acquire_point, dwell_time)

    def acquire_spectrum(self, exposure: float) -> tuple[np.ndarray, np.ndarray]:
        return self._call(self.sim.acquire_spectrum, exposure)

    def aberrations(self) -> dict[str, float]:
        return self.sim.aberrations()

    def set_aberrations(self, values: dict[str, float]) -> dict[str, float]:
        return self._call(self.sim.set_aberrations, values)

    def blanked(self) -> bool:
        return self.sim.blanked()

    def set_blanked(self, blanked: bool) -> None:
        self._call(self.sim.set_blanked, blanked)

    def make_safe(self) -> None:
        self._call(self.sim.make_safe)

    def start_episode(self, seed: int) -> dict[str, float]:
        return self._call(self.sim.start_episode, seed)


# --------------------------------------------------------------------------------------------
# Dispatch


def _number(p: dict[str, Any], key: str) -> float:
    v = p.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise GatewayError(INVALID_PARAMS, f"`{key}` must be a number, got {v!r}")
    return float(v)


def _scan_params(p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("rows", "cols"):
        v = p.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise GatewayError(INVALID_PARAMS, f"`{k}` must be a non-negative integer, got {v!r}")
        out[k] = v
    for k in ("pixel_size", "dwell_time", "flyback_time"):
        out[k] = _number(p, k)
    c = p.get("center")
    if not (isinstance(c, list) and len(c) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in c)):
        raise GatewayError(INVALID_PARAMS, f"`center` must be [x, y] in m, got {c!r}")
    out["center"] = [float(c[0]), float(c[1])]
    return out


def _scan_out(s: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(map(float, s[k])) if k == "center" else s[k]) for k in _SCAN}


class Gateway:
    """Dispatches requests to a :class:`Backend`; one lock serializes calls unless the backend
    is thread safe, and ``make_safe`` never waits for it longer than ``safe_wait`` s before
    calling the backend anyway (a lab backend's ``make_safe`` must tolerate that)."""

    def __init__(self, backend: Backend, max_message: int = DEFAULT_MAX_MESSAGE, safe_wait: float = 1.0) -> None:
        self.backend = backend
        self.max_message = max_message
        self.safe_wait = safe_wait
        self.lock = threading.Lock()
        self.log: list[str] = []

    METHODS = (
        "info", "status", "clock", "get_probe_position", "set_probe_position", "get_scan",
        "configure_scan", "acquire_frame", "acquire_point", "acquire_spectrum", "get_aberrations",
        "set_aberrations", "set_blanked", "get_blanked", "make_safe", "start_episode",
    )  # fmt: skip

    def handle(self, method: str, p: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
        self.log.append(method)
        if method not in self.METHODS:
            raise GatewayError(METHOD_NOT_FOUND, f"no method `{method}`")
        if method == "make_safe":
            got = self.backend.thread_safe or self.lock.acquire(timeout=self.safe_wait)
            try:
                self.backend.make_safe()
                return {"blanked": bool(self.backend.blanked())}, []
            finally:
                if got and not self.backend.thread_safe:
                    self.lock.release()
        if self.backend.thread_safe:
            return self._dispatch(method, p)
        with self.lock:
            return self._dispatch(method, p)

    def _dispatch(self, method: str, p: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
        b = self.backend
        if method == "info":
            i = b.info()
            return {
                "protocol": PROTOCOL_VERSION, "name": str(i["name"]), "simulated": bool(i["simulated"]),
                "kind": "stem", "max_message_size": self.max_message, "methods": list(self.METHODS),
            }, []  # fmt: skip
        if method == "status":
            return {
                "clock": float(b.clock()), "blanked": bool(b.blanked()),
                "probe_position": list(map(float, b.probe_position())),
                "beam_energy": float(b.beam_energy()), "beam_current": float(b.beam_current()),
                "scan": _scan_out(b.scan()), "aberrations": {k: float(v) for k, v in b.aberrations().items()},
            }, []  # fmt: skip
        if method == "clock":
            return {"clock": float(b.clock())}, []
        if method == "get_probe_position":
            return {"position": list(map(float, b.probe_position()))}, []
        if method == "set_probe_position":
            pos = p.get("position")
            if not (isinstance(pos, list) and len(pos) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pos)):
                raise GatewayError(INVALID_PARAMS, f"`position` must be [x, y] in m, got {pos!r}")
            b.move_probe(float(pos[0]), float(pos[1]))
            return {"position": list(map(float, b.probe_position()))}, []
        if method == "get_scan":
            return _scan_out(b.scan()), []
        if method == "configure_scan":
            return _scan_out(b.configure_scan(_scan_params(p))), []
        if method == "acquire_frame":
            img, meta = b.acquire_frame()
            img = np.asarray(img, dtype="<f4")
            if img.ndim != 2:
                raise GatewayError(INTERNAL_ERROR, f"backend frame has shape {img.shape}, expected 2-D")
            m = {
                "index": int(meta["index"]), "t_start": float(meta["t_start"]), "duration": float(meta["duration"]),
                "electrons_per_pixel": float(meta["electrons_per_pixel"]), "dose": float(meta["dose"]),
            }  # fmt: skip
            return {"meta": m}, [("image", img)]
        if method == "acquire_point":
            return {"counts": float(b.acquire_point(_number(p, "dwell_time")))}, []
        if method == "acquire_spectrum":
            e, c = b.acquire_spectrum(_number(p, "exposure"))
            e, c = np.asarray(e, dtype="<f8").ravel(), np.asarray(c, dtype="<f4").ravel()
            if e.shape != c.shape:
                raise GatewayError(INTERNAL_ERROR, f"energy has {e.size} channels, counts {c.size}")
            return {}, [("energy", e), ("counts", c)]
        if method == "get_aberrations":
            return {k: float(v) for k, v in b.aberrations().items()}, []
        if method == "set_aberrations":
            unknown = set(p) - set(_ABERRATIONS)
            if unknown:
                raise GatewayError(INVALID_PARAMS, f"unknown aberration keys {sorted(unknown)}")
            values = {k: _number(p, k) for k in _ABERRATIONS if k in p}
            return {k: float(v) for k, v in b.set_aberrations(values).items()}, []
        if method == "set_blanked":
            v = p.get("blanked")
            if not isinstance(v, bool):
                raise GatewayError(INVALID_PARAMS, f"`blanked` must be true or false, got {v!r}")
            b.set_blanked(v)
            return {"blanked": bool(b.blanked())}, []
        if method == "get_blanked":
            return {"blanked": bool(b.blanked())}, []
        if method == "start_episode":
            seed = p.get("seed")
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise GatewayError(INVALID_PARAMS, f"`seed` must be an integer in [0, 2^64), got {seed!r}")
            return {"params": {k: float(v) for k, v in b.start_episode(seed).items()}}, []
        raise GatewayError(METHOD_NOT_FOUND, f"no method `{method}`")

    def reply(self, header: dict[str, Any]) -> bytes:
        """The reply to one request header."""
        rid = header.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool) or not isinstance(header.get("method"), str):
            return encode_message({"jsonrpc": "2.0", "id": None, "error": {"code": INVALID_REQUEST, "message": "needs an integer `id` and a string `method`"}})
        params = header.get("params", {})
        try:
            if not isinstance(params, dict):
                raise GatewayError(INVALID_PARAMS, "`params` must be an object")
            result, att = self.handle(header["method"], params)
            return encode_message({"jsonrpc": "2.0", "id": rid, "result": result}, att)
        except GatewayError as e:
            err = {"code": e.code, "message": e.message}
        except Exception as e:  # noqa: BLE001: a shim's exception must reach the client
            err = {"code": INTERNAL_ERROR, "message": f"{type(e).__name__}: {e}"}
        return encode_message({"jsonrpc": "2.0", "id": rid, "error": err})


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        gw = self.server.gateway
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                msg = read_message(self.rfile, gw.max_message)
            except ProtocolError as e:
                code = TOO_LARGE if "too large" in str(e) else PARSE_ERROR
                try:
                    self.wfile.write(encode_message({"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": str(e)}}))
                except OSError:
                    pass
                return
            except OSError:
                return
            if msg is None:
                return
            try:
                self.wfile.write(gw.reply(msg[0]))
                self.wfile.flush()
            except OSError:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], gateway: Gateway) -> None:
        self.gateway = gateway
        super().__init__(addr, _Handler)


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 0, max_message: int = DEFAULT_MAX_MESSAGE) -> _Server:
    """A bound server (not yet serving): call ``serve_forever()``, or run it on a thread."""
    return _Server((host, port), Gateway(backend, max_message))


def _load_backend(spec: str) -> Backend:
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name or "Backend")
    return cls()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="serve the simulator of this scopegym STEM task, e.g. scopegym/StemAutofocus-v2")
    src.add_argument("--backend", help="serve a lab backend: module:Class (a Backend subclass, built with no arguments)")
    ap.add_argument("--config-json", help="task config as a JSON object (simulator backend)")
    ap.add_argument("--scenario", help="scenario TOML file whose [task] configures the task (simulator backend)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    ap.add_argument("--port", type=int, default=7001, help="port; 0 picks a free one (default 7001)")
    ap.add_argument("--max-message", type=int, default=DEFAULT_MAX_MESSAGE, help="largest message, bytes")
    a = ap.parse_args(argv)
    backend = SimulatorBackend(a.task, a.config_json, a.scenario) if a.task else _load_backend(a.backend)
    server = serve(backend, a.host, a.port, a.max_message)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        try:
            backend.make_safe()
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
