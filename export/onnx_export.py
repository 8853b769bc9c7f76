"""ONNX export of a folded backbone with the dynamo exporter (torch >= 2.5; onnxscript).

The graph maps `images` (N, C, H, W) float32 to `features` (N, D) with a dynamic batch
dimension, opset 20, weights inside the file. Works with torch 2.11 (the GPU machine) and 2.13.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_edge.errors import MtlEdgeError

log = logging.getLogger(__name__)

OPSET = 20
INPUT_NAME = "images"
OUTPUT_NAME = "features"
#: Ops a folded backbone must not contain: SS (Mul, Expand) and BN were folded away.
FORBIDDEN_OPS = ("BatchNormalization", "Mul", "Expand")
#: Largest batch the exported graph accepts (only a bound for the exporter's shape checks).
MAX_BATCH = 4096


class FeatureGraph(nn.Module):
    """Exposes `backbone.forward_features` as `forward(images)` for export."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) float32 -> features (N, D)."""
        backbone: Any = self.backbone
        return backbone.forward_features(images)


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    path: str | Path,
    opset: int = OPSET,
    example_batch: int = 2,
) -> Path:
    """Export a folded backbone to an ONNX file and check it.

    Args:
        model: folded network with `forward_features(x (N, C, H, W)) -> (N, D)`.
        input_shape: (C, H, W) of one preprocessed image.
        path: output file (weights stored inside it).
        opset: ONNX opset version.
        example_batch: batch of the example input; at least 2 so that the exporter does not
            specialise the batch dimension to 1.

    Returns:
        `path`.

    Raises:
        MtlEdgeError: the exporter failed, or the graph still holds a forbidden op.
    """
    import onnx

    if example_batch < 2:
        raise ValueError("example_batch must be >= 2 (batch 1 gets specialised away)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = FeatureGraph(model).eval()
    example = torch.randn(example_batch, *input_shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")  # exporter deprecation chatter, not actionable here
        try:
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={"images": {0: batch}},
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MtlEdgeError(
                f"{path}: ONNX export failed ({type(e).__name__}: {first}); the backbone "
                "must be traceable by torch.export"
            ) from e
    model_proto = onnx.load(str(path))
    onnx.checker.check_model(model_proto, full_check=True)
    check_graph(model_proto, path)
    log.info("exported %s (%s)", path, summarize_ops(model_proto))
    return path


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Keep the exporter's per-pass INFO lines and missing-torchvision notes out of the CLI."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def op_counts(model_proto: object) -> Counter[str]:
    """How often each op type occurs in the main graph of an `onnx.ModelProto`."""
    return Counter(node.op_type for node in model_proto.graph.node)  # type: ignore[attr-defined]


def summarize_ops(model_proto: object) -> str:
    """'Conv x12, Relu x12, ...' for log lines and reports."""
    return ", ".join(f"{op} x{n}" for op, n in sorted(op_counts(model_proto).items()))


def check_graph(model_proto: object, path: Path) -> None:
    """Check the graph's interface and that folding left no BN / SS ops.

    Raises:
        MtlEdgeError: wrong input/output names, a non-dynamic batch, or a forbidden op.
    """
    graph = model_proto.graph  # type: ignore[attr-defined]
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise MtlEdgeError(
            f"{path}: graph is {inputs} -> {outputs}, expected [{INPUT_NAME!r}] -> "
            f"[{OUTPUT_NAME!r}]"
        )
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    if dim0.HasField("dim_value"):
        raise MtlEdgeError(f"{path}: batch dimension is fixed to {dim0.dim_value}, not dynamic")
    found = {op: n for op, n in op_counts(model_proto).items() if op in FORBIDDEN_OPS}
    if found:
        raise MtlEdgeError(
            f"{path}: graph still holds {found}; SS or BatchNorm was not folded before export"
        )
