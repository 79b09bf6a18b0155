"""CUDA memory, streams and events through cuda-python's ``cuda.bindings`` runtime API.

cuda-python rather than pycuda: it ships wheels (pycuda compiles against the local CUDA toolkit), it
is NVIDIA's maintained binding, and current TensorRT samples use it. Every call returns an error code
first; ``_check`` turns anything but success into an EngineError that names the call and CUDA's own
description, so a missing driver reads "cudaGetDeviceCount: cudaErrorInsufficientDriver: ...".
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import EngineError

logger = logging.getLogger(__name__)

_cudart: ModuleType | None = None


def runtime() -> ModuleType:
    """``cuda.bindings.runtime``, imported on first use; EngineError if cuda-python is not installed."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise EngineError(f"cuda-python (cuda.bindings) is not installed: {exc}") from None
        _cudart = cudart
    return _cudart


def available() -> bool:
    """True when cuda-python imports (whether a GPU is present is device_count's question)."""
    try:
        runtime()
    except EngineError:
        return False
    return True


def _error_text(cudart: ModuleType, err: Any) -> str:
    name = getattr(err, "name", str(err))
    try:
        _, text = cudart.cudaGetErrorString(err)
        desc = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the error string is a courtesy; never mask the original error
        desc = ""
    return f"{name}: {desc}" if desc else str(name)


def _check(what: str, result: Any) -> Any:
    """Unpack ``(err, *values)``; EngineError naming ``what`` unless err is cudaSuccess."""
    cudart = runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"{what}: {_error_text(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One GPU: what a plan is tied to, and how much memory it has."""

    index: int
    name: str
    compute_capability: str
    total_memory_bytes: int


def device_count() -> int:
    """Number of CUDA devices; EngineError when there is no usable driver."""
    return int(_check("cudaGetDeviceCount", runtime().cudaGetDeviceCount()))


def device_info(index: int = 0) -> DeviceInfo:
    props = _check("cudaGetDeviceProperties", runtime().cudaGetDeviceProperties(index))
    raw = props.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return DeviceInfo(index, name.strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def set_device(index: int) -> None:
    _check("cudaSetDevice", runtime().cudaSetDevice(index))


def memory_info() -> tuple[int, int]:
    """(free, total) bytes on the current device."""
    free, total = _check("cudaMemGetInfo", runtime().cudaMemGetInfo())
    return int(free), int(total)


def versions() -> tuple[int, int]:
    """(runtime, driver) versions as CUDA encodes them (13000 = 13.0)."""
    cudart = runtime()
    return int(_check("cudaRuntimeGetVersion", cudart.cudaRuntimeGetVersion())), int(
        _check("cudaDriverGetVersion", cudart.cudaDriverGetVersion())
    )


class Stream:
    """A non-blocking CUDA stream: work on it does not wait for the legacy default stream."""

    def __init__(self) -> None:
        cudart = runtime()
        self._stream: Any = _check(
            "cudaStreamCreateWithFlags", cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
        )

    @property
    def handle(self) -> int:
        """The raw cudaStream_t, as TensorRT's execute_async_v3 takes it."""
        if self._stream is None:
            raise EngineError("CUDA stream used after it was destroyed")
        return int(self._stream)

    @property
    def raw(self) -> Any:
        if self._stream is None:
            raise EngineError("CUDA stream used after it was destroyed")
        return self._stream

    def __cuda_stream__(self) -> tuple[int, int]:
        """The CUDA stream protocol (version 0, handle): CuPy, PyTorch and cuda.core can run work on this stream."""
        return (0, self.handle)

    def synchronize(self) -> None:
        _check("cudaStreamSynchronize", runtime().cudaStreamSynchronize(self.raw))

    def destroy(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            _check("cudaStreamDestroy", runtime().cudaStreamDestroy(stream))


class Event:
    """A CUDA event, for timing work on a stream."""

    def __init__(self) -> None:
        self._event: Any = _check("cudaEventCreate", runtime().cudaEventCreate())

    def record(self, stream: Stream) -> None:
        _check("cudaEventRecord", runtime().cudaEventRecord(self._event, stream.raw))

    def synchronize(self) -> None:
        _check("cudaEventSynchronize", runtime().cudaEventSynchronize(self._event))

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event (both recorded, this one completed)."""
        return float(_check("cudaEventElapsedTime", runtime().cudaEventElapsedTime(start._event, self._event)))

    def destroy(self) -> None:
        if self._event is not None:
            event, self._event = self._event, None
            _check("cudaEventDestroy", runtime().cudaEventDestroy(event))


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise EngineError(f"device buffer of {nbytes} bytes requested")
        self.nbytes = nbytes
        self._ptr: int | None = int(_check(f"cudaMalloc({nbytes} bytes)", runtime().cudaMalloc(nbytes)))

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise EngineError("device buffer used after it was freed")
        return self._ptr

    def free(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            _check("cudaFree", runtime().cudaFree(ptr))


class PinnedBuffer:
    """``nbytes`` of page-locked host memory: async copies from it really are asynchronous (and faster)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise EngineError(f"pinned buffer of {nbytes} bytes requested")
        self.nbytes = nbytes
        self._ptr: int | None = int(_check(f"cudaMallocHost({nbytes} bytes)", runtime().cudaMallocHost(nbytes)))

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise EngineError("pinned buffer used after it was freed")
        return self._ptr

    def array(self, dtype: npt.DTypeLike, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """A numpy view of the first bytes of the buffer (no copy; valid until free())."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dt.itemsize > self.nbytes:
            raise EngineError(
                f"a {dt}{list(shape)} view needs {count * dt.itemsize} bytes; the buffer has {self.nbytes}"
            )
        raw = (ctypes.c_byte * (count * dt.itemsize)).from_address(self.ptr)
        view: npt.NDArray[Any] = np.frombuffer(memoryview(raw).cast("B"), dtype=dt, count=count)
        return view.reshape(shape)

    def free(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            _check("cudaFreeHost", runtime().cudaFreeHost(ptr))


def copy_h2d_async(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    """Queue a host-to-device copy of ``nbytes`` on ``stream``."""
    _bounds(nbytes, dst.nbytes, src.nbytes)
    cudart = runtime()
    _check(
        "cudaMemcpyAsync(host to device)",
        cudart.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw),
    )


def copy_d2h_async(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    """Queue a device-to-host copy of ``nbytes`` on ``stream``."""
    _bounds(nbytes, dst.nbytes, src.nbytes)
    cudart = runtime()
    _check(
        "cudaMemcpyAsync(device to host)",
        cudart.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw),
    )


def _bounds(nbytes: int, *sizes: int) -> None:
    if nbytes < 0 or any(nbytes > s for s in sizes):
        raise EngineError(f"copy of {nbytes} bytes overruns a buffer of {min(sizes)} bytes")
