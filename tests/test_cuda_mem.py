"""The cuda-python layer on a real GPU (skipped, with the reason, without one), and its errors without one."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from edge_agent.errors import EngineError
from edge_agent.inference import cuda_mem
from edge_agent.inference.tensorrt import Binding, Slot, TensorSpec


def _gpu_problem() -> str | None:
    if not cuda_mem.available():
        return "cuda-python (cuda.bindings) is not installed"
    try:
        count = cuda_mem.device_count()
    except EngineError as exc:
        return f"no usable CUDA device: {exc}"
    return None if count > 0 else "no CUDA device"


GPU_PROBLEM = _gpu_problem()
needs_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"needs a CUDA GPU: {GPU_PROBLEM}")


@pytest.mark.skipif(GPU_PROBLEM is None or not cuda_mem.available(), reason="this machine has a GPU")
def test_without_a_gpu_every_call_says_which_call_failed_and_why() -> None:
    with pytest.raises(EngineError, match=r"^cudaGetDeviceCount: cudaError\w+: .+"):
        cuda_mem.device_count()
    with pytest.raises(EngineError, match=r"^cudaMalloc\(1024 bytes\): cudaError\w+"):
        cuda_mem.DeviceBuffer(1024)
    with pytest.raises(EngineError, match=r"^cudaStreamCreateWithFlags: "):
        cuda_mem.Stream()


def test_buffer_sizes_are_checked_before_cuda_is_called() -> None:
    with pytest.raises(EngineError, match="device buffer of 0 bytes"):
        cuda_mem.DeviceBuffer(0)
    with pytest.raises(EngineError, match="pinned buffer of -1 bytes"):
        cuda_mem.PinnedBuffer(-1)


@pytest.fixture
def stream() -> Iterator[cuda_mem.Stream]:
    s = cuda_mem.Stream()
    try:
        yield s
    finally:
        s.destroy()


@needs_gpu
def test_device_info_names_the_gpu() -> None:
    info = cuda_mem.device_info(0)
    assert info.name and info.total_memory_bytes > 0
    major, minor = info.compute_capability.split(".")
    assert int(major) >= 5 and int(minor) >= 0
    free, total = cuda_mem.memory_info()
    assert 0 < free <= total


@needs_gpu
def test_pinned_round_trip_through_the_device(stream: cuda_mem.Stream) -> None:
    n = 1 << 20
    src, dst, dev = cuda_mem.PinnedBuffer(n * 4), cuda_mem.PinnedBuffer(n * 4), cuda_mem.DeviceBuffer(n * 4)
    try:
        src.array(np.float32, (n,))[...] = np.arange(n, dtype=np.float32)
        dst.array(np.float32, (n,))[...] = -1
        start, end = cuda_mem.Event(), cuda_mem.Event()
        start.record(stream)
        cuda_mem.copy_h2d_async(dev, src, n * 4, stream)
        cuda_mem.copy_d2h_async(dst, dev, n * 4, stream)
        end.record(stream)
        stream.synchronize()
        end.synchronize()
        assert end.elapsed_ms(start) >= 0.0
        np.testing.assert_array_equal(dst.array(np.float32, (n,)), np.arange(n, dtype=np.float32))
        start.destroy()
        end.destroy()
    finally:
        for buf in (src, dst, dev):
            buf.free()


@needs_gpu
def test_overruns_and_use_after_free_are_refused(stream: cuda_mem.Stream) -> None:
    host, dev = cuda_mem.PinnedBuffer(64), cuda_mem.DeviceBuffer(32)
    with pytest.raises(EngineError, match="overruns"):
        cuda_mem.copy_h2d_async(dev, host, 64, stream)
    with pytest.raises(EngineError, match="needs 128 bytes"):
        host.array(np.float32, (32,))
    dev.free()
    dev.free()  # twice is harmless
    with pytest.raises(EngineError, match="after it was freed"):
        cuda_mem.copy_h2d_async(dev, host, 16, stream)
    host.free()


@needs_gpu
def test_huge_allocation_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match=r"cudaMalloc\(\d+ bytes\): cudaErrorMemoryAllocation"):
        cuda_mem.DeviceBuffer(1 << 50)


@needs_gpu
def test_slot_copies_around_execute() -> None:
    """A Slot with a device-to-device copy as its 'network': what goes in comes out, for each batch size."""
    cudart = cuda_mem.runtime()
    spec_in = TensorSpec("x", True, np.dtype(np.float32), (-1, 2, 3))
    spec_out = TensorSpec("y", False, np.dtype(np.float32), (-1, 2, 3))
    layout = [Binding(spec_in, (4, 2, 3), 4 * 6 * 4), Binding(spec_out, (4, 2, 3), 4 * 6 * 4)]
    slot = Slot(layout)

    def execute(s: Slot, n: int) -> None:
        err, *_ = cudart.cudaMemcpyAsync(
            s.device["y"].ptr,
            s.device["x"].ptr,
            layout[0].nbytes_for(n),
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
            s.stream.raw,
        )
        assert err == cudart.cudaError_t.cudaSuccess

    try:
        for n in (1, 3, 4):
            batch = np.random.default_rng(n).normal(size=(n, 2, 3)).astype(np.float32)
            out = slot.run(batch, execute)
            np.testing.assert_array_equal(out["y"], batch)
        with pytest.raises(EngineError, match="exceeds the 4"):
            slot.run(np.zeros((5, 2, 3), np.float32), execute)
    finally:
        slot.free()
