"""Declarative map between Hugging Face Llama / Mistral / Mixtral tensor names and our params.

A `Rule` pairs one HF tensor name (with `{layer}` / `{expert}` slots) with one of our param paths
and a `Transform` (HF layout -> ours, and back). `plan(model)` expands the rules of the model's
naming into a `Leaf` per param: its path, shape, and the HF tensors that fill it, each at an
index into the leaf (scanned stacks put layers on a leading `[L]` axis; expert weights stack
experts on the axis after it).

Layouts (HF `nn.Linear.weight` is `[out, in]`; ours are `[in, ...out]`):

    HF                                             ours                                 transform
    model.embed_tokens.weight       [V, E]         input_embed/embedding       [V, E]    copy
    model.norm.weight               [E]            decoder/final_norm/scale    [E]       copy
    lm_head.weight                  [V, E]         head/kernel                 [E, V]    transpose
    *.input_layernorm.weight        [E]            self_attention_norm/scale   [E]       copy
    *.post_attention_layernorm.w..  [E]            mlp_norm/scale              [E]       copy
    *.self_attn.q_proj.weight       [H*D, E]       self_attention/query/kernel [E, H, D] in_heads
    *.self_attn.k_proj / v_proj     [K*D, E]       .../key|value/kernel        [E, K, D] in_heads
    *.self_attn.o_proj.weight       [E, H*D]       self_attention/out/kernel   [H, D, E] out_heads
    *.mlp.gate_proj / up_proj       [F, E]         mlp/wi_gate|wi_up/kernel    [E, F]    transpose
    *.mlp.down_proj.weight          [E, F]         mlp/wo/kernel               [F, E]    transpose
    *.block_sparse_moe.gate.weight  [X, E]         moe/router                  [E, X]    transpose
    *.experts.{j}.w1 (gate) / w3 (up) [F, E]       moe/wi_gate|wi_up [X, E, F] at [j]    transpose
    *.experts.{j}.w2 (down)         [E, F]         moe/wo            [X, F, E] at [j]    transpose

Head `h` of HF's q/k/v projections is rows `h*D:(h+1)*D`, and kv head `k` serves query heads
`k*H/K:(k+1)*H/K` (`repeat_kv`), as in our `[E, H, D]` kernels and GQA. Both rotate query/key
dims `i` and `i + D/2` together (HF `rotate_half`, our "half" RoPE layout), so no permutation of
q/k columns is needed (MaxText's `permute_to_match_maxtext_rope` is for an interleaved RoPE).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from nexus_jax.models.transformer import Decoder


@dataclasses.dataclass(frozen=True)
class Transform:
  """`to_ours(hf_tensor, our_shape) -> ours`, `to_hf(ours) -> hf_tensor` (numpy or jax arrays)."""

  name: str
  to_ours: Callable[[Any, tuple[int, ...]], Any]
  to_hf: Callable[[Any], Any]


COPY = Transform("copy", lambda w, shape: w.reshape(shape), lambda x: x)
TRANSPOSE = Transform("transpose", lambda w, shape: w.T.reshape(shape), lambda x: x.T)
# [heads*D, E] <-> [E, heads, D] (q / k / v projections)
IN_HEADS = Transform(
    "in_heads", lambda w, shape: w.T.reshape(shape), lambda x: x.reshape(x.shape[0], -1).T
)
# [E, H*D] <-> [H, D, E] (output projection)
OUT_HEADS = Transform(
    "out_heads", lambda w, shape: w.T.reshape(shape), lambda x: x.reshape(-1, x.shape[-1]).T
)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str  # HF tensor name; "{layer}" / "{expert}" are filled in
  ours: str  # our param path ("/"-separated); per-layer rules are relative to the layer
  transform: Transform


TOP = (
    Rule("model.embed_tokens.weight", "input_embed/embedding", COPY),
    Rule("model.norm.weight", "decoder/final_norm/scale", COPY),
    Rule("lm_head.weight", "head/kernel", TRANSPOSE),
)
ATTENTION = (
    Rule("model.layers.{layer}.input_layernorm.weight", "self_attention_norm/scale", COPY),
    Rule("model.layers.{layer}.post_attention_layernorm.weight", "mlp_norm/scale", COPY),
    Rule("model.layers.{layer}.self_attn.q_proj.weight", "self_attention/query/kernel", IN_HEADS),
    Rule("model.layers.{layer}.self_attn.k_proj.weight", "self_attention/key/kernel", IN_HEADS),
    Rule("model.layers.{layer}.self_attn.v_proj.weight", "self_attention/value/kernel", IN_HEADS),
    Rule("model.layers.{layer}.self_attn.o_proj.weight", "self_attention/out/kernel", OUT_HEADS),
)
DENSE_MLP = (
    Rule("model.layers.{layer}.mlp.gate_proj.weight", "mlp/wi_gate/kernel", TRANSPOSE),
    Rule("model.layers.{layer}.mlp.up_proj.weight", "mlp/wi_up/kernel", TRANSPOSE),
    Rule("model.layers.{layer}.mlp.down_proj.weight", "mlp/wo/kernel", TRANSPOSE),
)
MIXTRAL_MOE = (Rule("model.layers.{layer}.block_sparse_moe.gate.weight", "moe/router", TRANSPOSE),)
_EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}"
MIXTRAL_EXPERTS = (
    Rule(_EXPERT + ".w1.weight", "moe/wi_gate", TRANSPOSE),
    Rule(_EXPERT + ".w3.weight", "moe/wi_up", TRANSPOSE),
    Rule(_EXPERT + ".w2.weight", "moe/wo", TRANSPOSE),
)

# naming -> (top-level rules, per-layer rules, per-expert rules)
NAMINGS = {
    "llama": (TOP, ATTENTION + DENSE_MLP, ()),  # Llama and Mistral
    "mixtral": (TOP, ATTENTION + MIXTRAL_MOE, MIXTRAL_EXPERTS),
}


@dataclasses.dataclass(frozen=True)
class Part:
  index: tuple[int, ...]  # where in the leaf this tensor goes (leading axes); () = all of it
  hf: str
  transform: Transform


@dataclasses.dataclass(frozen=True)
class Leaf:
  path: tuple[str, ...]
  shape: tuple[int, ...]
  parts: tuple[Part, ...]

  @property
  def name(self) -> str:
    return "/".join(self.path)


def naming(model: Decoder) -> str:
  """The HF naming a model converts to: "mixtral" with experts, else "llama"."""
  return "mixtral" if model.num_experts > 0 else "llama"


def plan(model: Decoder, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> list[Leaf]:
  """Every param of `model` (`shapes`: path -> shape, from `jax.eval_shape` of init) with the HF
  tensors that fill it. Raises ValueError naming a param no rule covers (or one covered twice)."""
  top, per_layer, per_expert = NAMINGS[naming(model)]
  parts: dict[tuple[str, ...], list[Part]] = {}

  def add(path: str, index: tuple[int, ...], rule: Rule, **slots):
    parts.setdefault(tuple(path.split("/")), []).append(
        Part(index, rule.hf.format(**slots), rule.transform)
    )

  for rule in top:
    add(rule.ours, (), rule)
  for layer in range(model.num_layers):
    prefix, index = (
        ("decoder/layers/", (layer,)) if model.scan_layers else (f"decoder/layers_{layer}/", ())
    )
    for rule in per_layer:
      add(prefix + rule.ours, index, rule, layer=layer)
    for expert in range(model.num_experts if per_expert else 0):
      for rule in per_expert:
        add(prefix + rule.ours, index + (expert,), rule, layer=layer, expert=expert)
  uncovered = sorted("/".join(p) for p in set(shapes) - set(parts))
  if uncovered:
    raise ValueError(
        f"no {naming(model)} tensor maps to our param(s) {uncovered}; the model has a part HF "
        "Llama / Mistral / Mixtral lack (see pretrained.check_convertible)."
    )
  leaves = []
  for path, ps in parts.items():
    if path not in shapes:
      raise ValueError(f"the {naming(model)} key map names {'/'.join(path)}, which the model lacks")
    leaves.append(Leaf(path, tuple(shapes[path]), tuple(ps)))
  return leaves
