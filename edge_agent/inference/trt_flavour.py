"""The two flavours of TensorRT, and only what differs between them.

- **tensorrt**: NVIDIA's full TensorRT 10/11 (module ``tensorrt``, libraries from NVIDIA's own index, JetPack
  or NVIDIA's containers). Data-centre GPUs, Jetson. A plan is built on the GPU it will run on.
- **tensorrt-rtx**: TensorRT for RTX (module ``tensorrt_rtx_bindings``, wheels on PyPI: the optional
  dependency group ``tensorrt-rtx``). RTX-class GPUs from Turing to Blackwell and the L4/L40S/A10/A40/A2. Its
  builder makes plans ahead of time for named compute capabilities on a machine without a GPU; the GPU
  compiles the kernels when the plan is first run.

Slots, buffers, the plan cache and the engine are shared (tensorrt.py, trt_build.py, plan_cache.py).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from edge_agent.errors import EngineError

Flavour = Literal["tensorrt", "tensorrt-rtx"]
TENSORRT: Flavour = "tensorrt"
TENSORRT_RTX: Flavour = "tensorrt-rtx"
FLAVOURS: tuple[Flavour, ...] = (TENSORRT, TENSORRT_RTX)

# TensorRT-RTX's build targets, by compute capability ("8.6") -> the name in trt.ComputeCapability. NVIDIA's
# support matrix lists 7.5, 8.6, 8.9, 12.0 and 12.1 on Linux x86-64; 8.0 (A100, A30) is a target of the
# builder too. Not 8.7 (Jetson Orin) nor 9.0 (Hopper) nor 10.0: those are the full TensorRT's.
RTX_TARGETS: dict[str, str] = {
    "7.5": "SM75",
    "8.0": "SM80",
    "8.6": "SM86",
    "8.9": "SM89",
    "12.0": "SM120",
    "12.1": "SM121",
}
# What the README and the CI build: every target above.
RTX_DEFAULT_TARGETS: tuple[str, ...] = tuple(RTX_TARGETS)

# Names used on TensorRT-RTX code paths only (the full TensorRT 11.4 has none of them); tests/test_tensorrt_api.py
# checks every other name against both bindings.
RTX_ONLY = frozenset(
    {"ComputeCapability", "EngineValidity", "INVALID", "num_compute_capabilities", "set_compute_capability"}
)

_CAPABILITY = re.compile(r"^(?:sm_?)?(\d{1,2})\.?(\d)$", re.IGNORECASE)

_modules: dict[Flavour, ModuleType] = {}


def parse_capability(text: str) -> str:
    """A compute capability as "8.6" from "sm86", "SM_86", "86" or "8.6"; ValueError otherwise."""
    m = _CAPABILITY.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a compute capability (write it as sm86 or 8.6)")
    return f"{int(m.group(1))}.{m.group(2)}"


def sm_name(capability: str) -> str:
    """ "8.6" -> "sm86", as the command line spells it."""
    return "sm" + capability.replace(".", "")


def import_flavour(flavour: Flavour) -> ModuleType:
    """The flavour's Python module; EngineError with the reason when it is not installed or will not load."""
    if flavour not in _modules:
        try:
            if flavour == TENSORRT_RTX:
                import tensorrt_rtx_bindings as trt  # its package preloads the tensorrt_rtx_libs wheel
            elif flavour == TENSORRT:
                import tensorrt as trt
            else:
                raise EngineError(f"unknown TensorRT flavour {flavour!r}")
        except ImportError as exc:
            extra = " (pip install 'edge-agent[tensorrt-rtx]')" if flavour == TENSORRT_RTX else ""
            raise EngineError(f"{describe(flavour)} is not installed or cannot load{extra}: {exc}") from None
        _modules[flavour] = trt
    return _modules[flavour]


def describe(flavour: Flavour) -> str:
    return "TensorRT for RTX" if flavour == TENSORRT_RTX else "TensorRT"


def trt_major(trt: ModuleType) -> int:
    """The major version of a loaded TensorRT module (10 or 11; 1 for TensorRT-RTX 1.x)."""
    try:
        return int(str(trt.__version__).split(".", 1)[0])
    except ValueError:
        raise EngineError(f"unrecognised TensorRT version {trt.__version__!r}") from None


def strongly_typed(flavour: Flavour, trt: ModuleType) -> bool:
    """Whether the tensors' own types decide precision (TensorRT 11 and TensorRT-RTX: no FP16/INT8 flags)."""
    return flavour == TENSORRT_RTX or trt_major(trt) >= 11


def rtx_target_name(capability: str) -> str:
    """ "8.6" -> "SM86"; EngineError for a capability TensorRT-RTX does not serve."""
    name = RTX_TARGETS.get(capability)
    if name is None:
        targets = ", ".join(sm_name(c) for c in RTX_TARGETS)
        raise EngineError(
            f"TensorRT for RTX does not serve compute capability {capability} ({sm_name(capability)}); its targets "
            f"are {targets}. Hopper (sm90), Jetson Orin (sm87) and sm100 are served by the full TensorRT"
        )
    return name


def rtx_target(trt: ModuleType, capability: str) -> object:
    """The ``trt.ComputeCapability`` member for a capability; EngineError for one TensorRT-RTX cannot build."""
    name = rtx_target_name(capability)
    if not hasattr(trt.ComputeCapability, name):
        raise EngineError(f"TensorRT for RTX {trt.__version__} has no build target {name}")
    return getattr(trt.ComputeCapability, name)


# -- what a TensorRT-RTX plan says about itself, read without the library or a GPU ---------------------------
#
# The first 64 bytes of a plan from TensorRT-RTX 1.7 (not documented by NVIDIA; read from plans built here and
# checked by tests/test_tensorrt_rtx.py against every build): b"vtrt" at 0 and at 0x1c, the plan's length at
# 0x10 (u64), the library version at 0x18 (four bytes: 1, 7, 1, 116) and the targets as a bit mask at 0x20 (u64).
# The daemon reads it before handing a plan to the runtime, so that a plan for another flavour, version or
# capability is refused with a clear reason and never reaches a CUDA call.

_RTX_MAGIC = b"vtrt"
_RTX_HEADER_BYTES = 64
_RTX_MASK_BITS = {"7.5": 0x01, "8.0": 0x02, "8.6": 0x04, "8.9": 0x08, "12.0": 0x10, "12.1": 0x20}


@dataclass(frozen=True, slots=True)
class RtxPlanHeader:
    version: str
    capabilities: tuple[str, ...]
    length: int


def read_rtx_header(plan: bytes) -> RtxPlanHeader:
    """The header of a TensorRT-RTX plan; ValueError when ``plan`` is not one."""
    if len(plan) < _RTX_HEADER_BYTES or plan[:4] != _RTX_MAGIC or plan[0x1C:0x20] != _RTX_MAGIC:
        raise ValueError("not a TensorRT for RTX plan")
    (length,) = struct.unpack_from("<Q", plan, 0x10)
    version = ".".join(str(b) for b in plan[0x18:0x1C])
    (mask,) = struct.unpack_from("<Q", plan, 0x20)
    caps = tuple(c for c, bit in _RTX_MASK_BITS.items() if mask & bit)
    return RtxPlanHeader(version, caps, int(length))


def plan_problems(flavour: Flavour, plan: bytes, version: str, capability: str) -> list[str]:
    """Why ``plan`` cannot run under this flavour and library version on a GPU of ``capability`` (empty: it can).

    Full TensorRT plans carry no header this module can read; their metadata (plan_cache.py) and TensorRT's
    own check at deserialisation decide. A TensorRT-RTX plan is read here.
    """
    if flavour != TENSORRT_RTX:
        if plan[:4] == _RTX_MAGIC:
            return ["it is a TensorRT for RTX plan, and this model runs on the full TensorRT"]
        return []
    try:
        header = read_rtx_header(plan)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    if header.length != len(plan):
        problems.append(f"it is {len(plan)} bytes long, and its header says {header.length} (truncated or altered)")
    if header.version != version:
        problems.append(f"it was built by TensorRT for RTX {header.version}, and this is {version}")
    if capability not in header.capabilities:
        built_for = ", ".join(sm_name(c) for c in header.capabilities) or "no known target"
        problems.append(f"it was built for {built_for}, and this GPU is {sm_name(capability)}")
    return problems


# EngineInvalidityDiagnostics of TensorRT-RTX's Runtime.get_engine_validity, as bits.
_RTX_DIAGNOSTICS = {
    1: "built by another TensorRT for RTX version",
    2: "not built for this GPU's compute capability",
    4: "the CUDA driver is too old",
    8: "the CUDA runtime is too old",
    16: "not enough GPU memory",
    32: "not a TensorRT for RTX plan (malformed)",
    64: "a CUDA error while checking",
}


def runtime_verdict(trt: ModuleType, trt_runtime: object, plan: bytes) -> str | None:
    """The runtime's own check of a plan (TensorRT-RTX's ``get_engine_validity``): None if it may be loaded,
    else why not in words. Runtimes without the check (the full TensorRT) answer None."""
    check = getattr(trt_runtime, "get_engine_validity", None)
    if check is None:
        return None
    validity, flags = check(plan)
    if validity != trt.EngineValidity.INVALID:
        return None  # VALID, or SUBOPTIMAL (it runs)
    reasons = [text for bit, text in _RTX_DIAGNOSTICS.items() if int(flags) & bit]
    return "; ".join(reasons) or "invalid, without a reason given (no usable GPU?)"
