"""torch.distributed glue for trusted clusters (torchrun): DDP and FSDP2. No engine of our own."""

from swarmlm.cluster.distributed import TorchDistributed, from_environment

__all__ = ["TorchDistributed", "from_environment"]
