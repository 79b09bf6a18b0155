"""The means of injecting faults: a TCP proxy between daemon and broker, unremovable files, read-only mounts,
and a deliberately slow model. The harness that uses them is tests/faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tests.daemon import REPO
from tests.netutil import free_port


class CannotInject(Exception):
    """This machine cannot inject the fault (not root, no chattr, no mount): the scenario does not run."""


class FaultProxy:
    """A TCP proxy between the daemon and nats-server that can swallow the broker's replies, or vanish.

    ``drop_replies()``: bytes from the broker are dropped (a PubAck never arrives, so a publish that the stream
    stored times out: an ambiguous publish). ``cut()``: every connection is reset and the port refuses
    (the broker is gone, from the daemon's side). ``restore()``: back to a plain pipe on the same port.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._drop = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=15)

    def start(self) -> FaultProxy:
        self._call(self._listen())
        return self

    async def _listen(self) -> None:
        self._drop = False
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_broker: bool) -> None:
            try:
                while data := await src.read(65536):
                    if from_broker and self._drop:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        self._writers -= {writer, up_writer}

    def drop_replies(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_drop", True)

    def cut(self) -> None:
        self._call(self._cut())

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i``: files that not even root can remove (EPERM) until the context ends."""
    done: list[Path] = []
    try:
        for p in paths:
            res = _run("chattr", "+i", str(p))
            if res.returncode != 0:
                raise CannotInject(f"chattr +i failed (needs root and a file system with the immutable flag): "
                                   f"{res.stderr.strip()}")
            done.append(p)
        yield
    finally:
        for p in done:
            _run("chattr", "-i", str(p))


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[None]:
    """Mount ``path`` over itself read-only: writes and unlinks in it fail with EROFS, even for root."""
    res = _run("mount", "--bind", str(path), str(path))
    if res.returncode != 0:
        raise CannotInject(f"cannot bind-mount (needs root): {res.stderr.strip()}")
    try:
        res = _run("mount", "-o", "remount,bind,ro", str(path))
        if res.returncode != 0:
            raise CannotInject(f"cannot remount read-only: {res.stderr.strip()}")
        yield
    finally:
        _run("umount", "-l", str(path))


def build_slow_model(folder: Path, seconds_per_image: float, *, name: str = "ct-slow") -> float:
    """A real ONNX model that takes about ``seconds_per_image`` per slice, as a card beside ct-demo's.

    A chain of 1024x1024 MatMuls (an orthogonal matrix, so values stay bounded) over the 256x256 input, then
    a sigmoid of the mean as the one label's score. The chain's length is calibrated on this machine. Returns
    the measured seconds per image.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((1024, 1024)))

    def model(links: int) -> bytes:
        nodes = [helper.make_node("Reshape", ["image", "shape"], ["h0"])]
        nodes += [helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(links)]
        nodes += [
            helper.make_node("ReduceMean", [f"h{links}"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Sigmoid", ["mean"], ["score"]),
            helper.make_node("Unsqueeze", ["score", "axis"], ["scores"]),
        ]
        graph = helper.make_graph(
            nodes, name,
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 256, 256])],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1])],
            [numpy_helper.from_array(q.astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 64, 1024], dtype=np.int64), "shape"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis")],
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return bytes(m.SerializeToString())

    def seconds(data: bytes) -> float:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        x = np.zeros((2, 1, 256, 256), dtype=np.float32)
        session.run(None, {"image": x})
        started = time.perf_counter()
        session.run(None, {"image": x})
        return (time.perf_counter() - started) / 2

    probe = 16
    links = max(probe, min(4000, round(probe * seconds_per_image / max(seconds(model(probe)), 1e-4))))
    data = model(links)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(data)
    card = yaml.safe_load((REPO / "engines" / "ct-demo" / "model.yaml").read_text())
    card.update(
        name=name,
        version=f"0.0.{links}-slow",
        description="A deliberately slow model for fault-injection tests: a chain of MatMuls; meaningless scores.",
        intended_use="Fault-injection tests only.",
        sha256=hashlib.sha256(data).hexdigest(),
        outputs={"scores": "scores"},
    )
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return seconds(data)


def model_repository(root: Path, seconds_per_image: float) -> tuple[Path, float]:
    """The bundled models (linked) plus ``ct-slow``: a repository for a daemon with a slow CT engine."""
    root.mkdir(parents=True, exist_ok=True)
    for bundled in sorted((REPO / "engines").iterdir()):
        if (bundled / "model.yaml").exists() and not (root / bundled.name).exists():
            (root / bundled.name).symlink_to(bundled, target_is_directory=True)
    return root, build_slow_model(root / "ct-slow", seconds_per_image)




def build_hanging_model(folder: Path, *, hangs: bool = True, at_warm_up: bool = False, name: str = "ct-hang") -> None:
    """A real ONNX model whose call on a real image does not return (a wedged GPU, as the daemon sees one), as a
    card beside ct-demo's; with ``hangs=False``, the same graph returning at once (the model replaced); with
    ``at_warm_up``, one whose every call hangs, the daemon's warm-up at start included.

    A Loop whose trip count is the input's largest magnitude (plus one, ``at_warm_up``) times 10^12 (about
    1.8 us a trip here): an all-zero batch (the warm-up) runs no trips, a CT slice's normalised input years of
    them. ONNX Runtime cannot stop a call once it runs, so the call holds its thread until the process ends.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scalar = [helper.make_tensor_value_info(n, t, []) for n, t in
              (("trip", TensorProto.INT64), ("cond_in", TensorProto.BOOL), ("v_in", TensorProto.FLOAT))]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "spin", scalar,
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    nodes = [
        helper.make_node("ReduceMax", ["image"], ["peak"], keepdims=0),
        helper.make_node("Abs", ["peak"], ["magnitude"]),
        helper.make_node("Add", ["magnitude", "offset"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "trips_per_unit"], ["trips_f"]),
        helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "", "zero"], ["spun"], body=body),
        helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Add", ["mean", "nothing"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
        helper.make_node("Unsqueeze", ["score", "axis"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 256, 256])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array(1e12 if hangs else 0.0, np.float32), "trips_per_unit"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(1.0 if at_warm_up else 0.0, np.float32), "offset"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "axis")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    data = bytes(m.SerializeToString())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(data)
    card = yaml.safe_load((REPO / "engines" / "ct-demo" / "model.yaml").read_text())
    card.update(
        name=name,
        version="0.0.1-hangs" if hangs else "0.0.2-returns",
        description="A model for fault-injection tests whose calls on real images never return; meaningless scores.",
        intended_use="Fault-injection tests only.",
        sha256=hashlib.sha256(data).hexdigest(),
        outputs={"scores": "scores"},
    )
    card.pop("drift_reference", None)
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
