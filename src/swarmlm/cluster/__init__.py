"""torch.distributed glue for trusted clusters (torchrun): DDP, FSDP2, and tp/pp/ep/dp layouts
on a DeviceMesh (``mesh.py``). No engine of our own."""

from swarmlm.cluster.distributed import TorchDistributed
from swarmlm.cluster.layout import Layout, LayoutError, parse_layout, resolve_layout
from swarmlm.cluster.mesh import MeshParallel, from_environment

__all__ = [
    "Layout",
    "LayoutError",
    "MeshParallel",
    "TorchDistributed",
    "from_environment",
    "parse_layout",
    "resolve_layout",
]
