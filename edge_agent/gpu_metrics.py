"""GPU metrics: device memory and utilisation from NVML, per-model engine memory, TensorRT plan info.

NVML (``nvidia-ml-py``) is optional: without it, or without a GPU, the device gauges are simply not
exported and the reason is logged once. The NVML gauges are read at scrape time by a collector, so a
scrape sees the GPU as it is, not as it was at the last tick. Label values are model names from the
repository and facts about the box (GPU name, TensorRT version), never anything from a DICOM peer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class _Nvml:
    """One NVML device handle, opened on first use; ``problem`` says why there is none."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.handle: Any = None
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._tried = False
        self.module: Any = None

    def get(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self.handle = pynvml.nvmlDeviceGetHandleByIndex(self.device)
                    self.module = pynvml
                except ImportError:
                    self.problem = "nvidia-ml-py is not installed"
                except Exception as exc:  # pynvml raises its own NVMLError_* family
                    self.problem = f"NVML unavailable: {exc}"
                if self.problem is not None:
                    logger.info("GPU device metrics off: %s", self.problem)
            return self.handle


class _NvmlCollector(Collector):
    def __init__(self, nvml: _Nvml) -> None:
        self._nvml = nvml

    def describe(self) -> list[Any]:
        return []  # the families depend on the box; nothing to pre-register

    def collect(self) -> Iterator[GaugeMetricFamily]:
        handle = self._nvml.get()
        if handle is None:
            return
        nv = self._nvml.module
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            util = nv.nvmlDeviceGetUtilizationRates(handle)
            procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception as exc:  # a GPU that fell off the bus must not break the whole scrape
            logger.warning("NVML query failed: %s", exc)
            return
        yield GaugeMetricFamily("edge_agent_gpu_memory_used_bytes", "GPU memory in use (all processes)", mem.used)
        yield GaugeMetricFamily("edge_agent_gpu_memory_total_bytes", "GPU memory in total", mem.total)
        yield GaugeMetricFamily(
            "edge_agent_gpu_utilization_ratio", "Fraction of the last sample period the GPU was busy", util.gpu / 100
        )
        own = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid == os.getpid())
        yield GaugeMetricFamily("edge_agent_gpu_process_memory_bytes", "GPU memory used by this process", own)


class GpuMetrics:
    """GPU gauges on the daemon's own registry (the one Metrics uses)."""

    def __init__(self, registry: CollectorRegistry, device: int = 0) -> None:
        self._nvml = _Nvml(device)
        registry.register(_NvmlCollector(self._nvml))
        self.engine_memory = Gauge(
            "edge_agent_engine_gpu_memory_bytes",
            "GPU memory held by a model's engine: I/O buffers, activation memory per context, plan weights",
            ["model"],
            registry=registry,
        )
        self.engine_build_seconds = Gauge(
            "edge_agent_engine_build_duration_seconds",
            "How long the model's TensorRT plan took to build (0 when none was built)",
            ["model"],
            registry=registry,
        )
        self.engine_plan = Info(
            "edge_agent_engine_plan",
            "The TensorRT plan each model runs: precision, TensorRT version, GPU, built now or cached",
            ["model"],
            registry=registry,
        )

    @property
    def nvml_problem(self) -> str | None:
        """Why there are no device gauges (None when NVML works or has not been asked yet)."""
        self._nvml.get()
        return self._nvml.problem

    def record_engine(self, model: str, engine: Any) -> None:
        """Publish what a loaded engine holds on the GPU; engines that hold nothing there are skipped."""
        memory = getattr(engine, "gpu_memory_bytes", None)
        if isinstance(memory, int):
            self.engine_memory.labels(model=model).set(memory)
        meta = getattr(engine, "plan_meta", None)
        if meta is None:
            return
        built = bool(getattr(engine, "built", False))
        self.engine_build_seconds.labels(model=model).set(meta.build_seconds if built else 0.0)
        self.engine_plan.labels(model=model).info(
            {
                "precision": meta.key.precision,
                "flavour": meta.key.flavour,
                "tensorrt_version": meta.key.trt_version,
                "gpu": meta.key.gpu_name,
                "compute_capability": meta.key.compute_capability,
                "source": "built" if built else "cache",
            }
        )
