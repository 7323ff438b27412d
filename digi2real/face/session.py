"""onnxruntime sessions with explicit providers and a fixed thread count."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")

# what onnxruntime raises for a file that is no model it can run (random bytes, a truncated
# or tampered graph, an operator it lacks); its other errors are the runtime's own
_MODEL_ERRORS = tuple(
    getattr(ort_state, name)
    for name in ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoModel", "NotImplemented")
    if hasattr(ort_state, name)
)
_RUNTIME_ERRORS = tuple(
    value
    for value in vars(ort_state).values()
    if isinstance(value, type) and issubclass(value, Exception) and value not in _MODEL_ERRORS
)


def parse_device(device: str) -> tuple[str, int]:
    """Split ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into (kind, index)."""
    match = _DEVICE_RE.match(device.strip().lower()) if isinstance(device, str) else None
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return match.group(1), int(match.group(2) or 0)


def providers_for(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """The provider list asked of onnxruntime for ``device`` (CPU always last)."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return [CPU_PROVIDER]
    return [(CUDA_PROVIDER, {"device_id": str(index)}), CPU_PROVIDER]


def make_session(
    model_path: str | Path,
    device: str = "cpu",
    *,
    intra_op_threads: int = 1,
) -> ort.InferenceSession:
    """Open ``model_path`` on ``device``; warn when CUDA was asked for but is not live.

    ``intra_op_threads`` is fixed (never onnxruntime's "all cores" default) because CPU
    kernels partition work by thread count, and results must not depend on the host;
    parallelism comes from workers, each with its own sessions.
    """
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    if intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    providers = providers_for(device)

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # On CUDA, ask for deterministic kernels (cuDNN algorithm choice), like the CPU path.
    options.use_deterministic_compute = True

    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except _MODEL_ERRORS as error:
        raise ValueError(f"{path} is not a usable ONNX model: {_reason(error)}") from None
    except _RUNTIME_ERRORS as error:
        if "Load model" in str(error):  # FAIL while loading: the graph is broken
            raise ValueError(f"{path} is not a usable ONNX model: {_reason(error)}") from None
        raise RuntimeError(f"onnxruntime could not open {path}: {_reason(error)}") from None
    # onnxruntime-gpu lists CUDA as available even without a usable GPU and silently
    # falls back to CPU, so only the session's own provider list tells the truth.
    live = session.get_providers()
    if parse_device(device)[0] == "cuda" and CUDA_PROVIDER not in live:
        logger.warning(
            "asked for %s on %s but onnxruntime runs it on %s", path.name, device, ", ".join(live)
        )
    logger.debug("session %s: providers %s", path.name, live)
    return session


def _reason(error: Exception) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load
    model from PATH failed:`` preamble, on one line."""
    text = " ".join(str(error).split())
    return text.split("failed:", 1)[1].strip() if "failed:" in text else text
