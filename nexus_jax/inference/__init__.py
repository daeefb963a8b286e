"""Inference: generation (KV cache, sampling, beam search, speculative decoding) and quantisation."""
