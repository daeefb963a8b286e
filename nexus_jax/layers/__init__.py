"""Reusable Flax Linen layers: attention (4 backends), norms, feed-forward, MoE, blocks.

Each module is importable on its own (`from nexus_jax.layers.moe import MoE`); the names below
are re-exported for convenience.
"""

from nexus_jax.layers.attention import Attention
from nexus_jax.layers.attention_ops import dot_product_attention, reference_attention
from nexus_jax.layers.blocks import TransformerBlock, TransformerStack
from nexus_jax.layers.feedforward import MLP
from nexus_jax.layers.kernels.chunked_attention import ChunkSizes
from nexus_jax.layers.kernels.flash_attention import BlockSizes, flash_attention
from nexus_jax.layers.moe import MoE
from nexus_jax.layers.norms import AdaptiveNorm, LayerNorm, RMSNorm, make_norm
from nexus_jax.layers.rotary import apply_rope

__all__ = [
    "AdaptiveNorm",
    "Attention",
    "BlockSizes",
    "ChunkSizes",
    "LayerNorm",
    "MLP",
    "MoE",
    "RMSNorm",
    "TransformerBlock",
    "TransformerStack",
    "apply_rope",
    "dot_product_attention",
    "flash_attention",
    "make_norm",
    "reference_attention",
]
