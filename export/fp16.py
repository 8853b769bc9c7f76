"""FP16 variant of the FP32 backbone, for GPUs (TensorRT strongly typed, onnxruntime CUDA).

Weights and activations become float16; the graph keeps float32 `images` and `features`
(`keep_io_types`), so callers feed and read the same arrays as with FP32. Uses onnxruntime's
own converter (`onnxruntime.transformers.float16`), which ships with onnxruntime: no extra
dependency (onnxconverter-common is not needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtl_edge.errors import UnavailableError


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Write the FP16 variant of `fp32_path` to `out_path`.

    Returns:
        {"converter", "keep_io_types"}.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise UnavailableError(
            f"the FP16 converter is not available ({e}); install onnxruntime >= 1.17 or drop --fp16"
        ) from None
    model = onnx.load(str(fp32_path))
    # Values beyond float16's range are clamped by the converter; keep_io_types adds Casts at
    # the graph's edges so the interface stays float32.
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _toposort(half.graph)
    onnx.checker.check_model(half)
    onnx.save(half, str(out_path))
    return {"converter": "onnxruntime.transformers.float16", "keep_io_types": True}


def _toposort(graph: Any) -> None:
    """Reorder `graph.node` in place so that every node follows its producers (the converter
    appends its input Casts at the end)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("FP16 graph has a cycle or an undefined input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
