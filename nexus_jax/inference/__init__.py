"""Inference: generation (KV cache, sampling, beam search, speculative decoding, early exit,
verified refinement, uncertainty and abstention) and quantisation.

Serving many requests at once: `engine.Engine` (continuous batching: slots with their own cache
positions, one jitted step for all) and `scheduler.DecodeServer` (FIFO queue, futures, streaming
callbacks, one engine thread); `row_sampling` holds the per-request sampling they use.

Optimisation of trained params (any params pytree: nested dicts of arrays), each returning a report:
int8 / packed int4 weight-only quantisation with per-channel or per-group scales (`quantize.py`)
and global magnitude pruning (`prune.py`).
"""

from nexus_jax.inference.prune import magnitude_prune, sparsity
from nexus_jax.inference.quantize import dequantize, is_quantized, quantize, quantize_int8, tree_bytes

__all__ = [
    "dequantize",
    "is_quantized",
    "magnitude_prune",
    "quantize",
    "quantize_int8",
    "sparsity",
    "tree_bytes",
]
