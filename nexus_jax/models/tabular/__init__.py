"""Tabular models: row encoders (FT-Transformer, TabNet, MLP/ResNet/TabM, LeanMLP), the "standard" set
encoder over one-to-many contexts, and their registry. See `registry.py` for the shared call convention;
`common.py` holds the shared layers and `token_attention.py` the attention every tabular model uses.
"""

from nexus_jax.models.tabular.ft_transformer import FT_TRANSFORMER_PRESETS, FTTransformer
from nexus_jax.models.tabular.lean_mlp import LeanMLP
from nexus_jax.models.tabular.mlp import MLP, ResNetMLP, TabM
from nexus_jax.models.tabular.registry import encoder_for_table, encoder_names, get_encoder, register_encoder
from nexus_jax.models.tabular.set_encoder import SetEncoder, StandardEncoder
from nexus_jax.models.tabular.tabnet import GhostBatchNorm, TabNet, entmax15, sparsemax, sparsity_loss

__all__ = [
    "FT_TRANSFORMER_PRESETS",
    "FTTransformer",
    "GhostBatchNorm",
    "LeanMLP",
    "MLP",
    "ResNetMLP",
    "SetEncoder",
    "StandardEncoder",
    "TabM",
    "TabNet",
    "encoder_for_table",
    "encoder_names",
    "entmax15",
    "get_encoder",
    "register_encoder",
    "sparsemax",
    "sparsity_loss",
]
