"""mtl-edge: Meta-Transfer Learning for few-shot recognition on edge devices.

The top-level package is the device side: it imports numpy and Pillow only. The training
stack (`mtl_edge.train`), export (`mtl_edge.export`) and benchmarks (`mtl_edge.bench`) are
imported explicitly by whoever needs them.
"""

from mtl_edge.errors import MtlEdgeError

__version__ = "0.1.0"

__all__ = ["MtlEdgeError", "__version__"]
