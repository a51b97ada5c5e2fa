"""The swarmlm transformer: config, layers, attention, mixture of experts, generation."""

from swarmlm.model.cache import KVCache
from swarmlm.model.config import BlockSparseConfig, ModelConfig
from swarmlm.model.transformer import ModelOutput, Transformer

__all__ = ["BlockSparseConfig", "KVCache", "ModelConfig", "ModelOutput", "Transformer"]
