"""ONNX Runtime engine (CPU): the portable backend, and the reference the GPU backend is checked against."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.errors import EngineError
from edge_agent.inference.card import ModelCard
from edge_agent.inference.engine import EngineOutput, FloatArray, check_batch, check_output

logger = logging.getLogger(__name__)

_ORT_LOG_ERRORS_ONLY = 3


class OnnxRuntimeEngine:
    """One ONNX Runtime session, on the execution providers given (the CPU unless told otherwise)."""

    backend = "onnxruntime"

    def __init__(
        self,
        card: ModelCard,
        intra_op_threads: int = 0,
        max_batch: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.card = card
        self.providers = tuple(providers)
        self.name = card.name
        self.input_shape = card.input_shape
        self.intra_op_threads = intra_op_threads
        self.max_batch = max_batch if max_batch is not None else card.batch.max
        self._session: ort.InferenceSession | None = None
        self._outputs: list[str] = []

    def load(self) -> None:
        """Create the session from the verified model bytes and check it against the card."""
        path = self.card.model_path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EngineError(f"{self.name}: cannot read {path}: {exc.strerror}") from None
        # Hash the bytes actually loaded, not the file as it was when the card was read.
        if hashlib.sha256(data).hexdigest() != self.card.sha256:
            raise EngineError(f"{self.name}: {path} does not match the card's sha256; refusing to load it")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = _ORT_LOG_ERRORS_ONLY
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle spinning threads would steal the cores that decode DICOM between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(data, sess_options=options, providers=list(self.providers))
        except Exception as exc:
            raise EngineError(f"{self.name}: ONNX Runtime cannot load {path}: {exc}") from None
        self._check_signature(session)
        self._session = session
        self._outputs = [self.card.outputs.scores]
        if self.card.outputs.heatmap is not None:
            self._outputs.append(self.card.outputs.heatmap)
        logger.debug("model %s %s: onnxruntime %s session created (CPU)", self.name, self.card.version, ort.__version__)

    def _check_signature(self, session: ort.InferenceSession) -> None:
        card = self.card
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        problems: list[str] = []
        spec = inputs.get(card.inputs.name)
        if spec is None:
            problems.append(f"no input {card.inputs.name!r} (the model has {sorted(inputs)})")
        else:
            if spec.type != "tensor(float)":
                problems.append(f"input {spec.name!r} is {spec.type}, expected tensor(float)")
            problems += _shape_problems(f"input {spec.name!r}", spec.shape, [None, *card.input_shape])
        if len(inputs) > 1:
            problems.append(f"the model has {len(inputs)} inputs; one is supported")
        n_labels = len(card.labels)
        scores = outputs.get(card.outputs.scores)
        if scores is None:
            problems.append(f"no output {card.outputs.scores!r} (the model has {sorted(outputs)})")
        else:
            problems += _shape_problems(f"output {scores.name!r}", scores.shape, [None, n_labels])
        if card.outputs.heatmap is not None:
            heat = outputs.get(card.outputs.heatmap)
            if heat is None:
                problems.append(f"no output {card.outputs.heatmap!r} (the model has {sorted(outputs)})")
            else:
                problems += _shape_problems(f"output {heat.name!r}", heat.shape, [None, n_labels, None, None])
        if problems:
            raise EngineError(f"{self.name}: the model does not match its card: " + "; ".join(problems))

    def warm_up(self) -> None:
        """One run at max batch and one at batch 1 (ORT allocates its arenas on first use)."""
        for n in (self.max_batch, 1):
            self.infer(np.zeros((n, *self.input_shape), dtype=np.float32))

    def infer(self, batch: FloatArray) -> EngineOutput:
        """Run one batch [N, C, H, W]; EngineError on any failure or malformed output."""
        session = self._session
        if session is None:
            raise EngineError(f"{self.name}: engine is not loaded")
        check_batch(self.name, self.input_shape, batch)
        try:
            result = session.run(self._outputs, {self.card.inputs.name: batch})
        except Exception as exc:
            raise EngineError(f"{self.name}: inference failed: {exc}") from None
        scores = np.asarray(result[0], dtype=np.float32)
        heatmap = np.asarray(result[1], dtype=np.float32) if len(result) > 1 else None
        return check_output(self.card, int(batch.shape[0]), EngineOutput(scores, heatmap))

    def close(self) -> None:
        self._session = None


def _shape_problems(what: str, actual: list[Any], expected: list[int | None]) -> list[str]:
    """Compare an ONNX shape (ints for fixed dims, str/None for dynamic) with the expected dims."""
    if len(actual) != len(expected):
        return [f"{what} has rank {len(actual)}, expected {len(expected)}"]
    out = []
    for axis, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if e is not None and isinstance(a, int) and a != e:
            out.append(f"{what} axis {axis} is {a}, expected {e}")
    return out
