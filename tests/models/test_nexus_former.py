"""NexusFormer: shapes, masks (absent contexts are ignored), refinement convergence, gating, errors, learning.

Compilation dominates on CPU, so tests share a few jitted functions of one small model (same shapes,
different variables / inputs) instead of compiling per test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nexus_jax.models.tabular.nexus_former import NexusFormer, TableFeatures

B = 6
TARGET = TableFeatures(3, (5, 4))
CONTEXTS = (
    ("k->parent", "parent", 1, TableFeatures(2, (3,))),
    ("hist.k=k", "hist", 5, TableFeatures(4, (6,))),
    ("other.k=k", "other", 3, TableFeatures(2, ())),
)
SMALL = dict(
    d_model=16,
    n_heads=2,
    pool_heads=2,
    d_head=16,
    refine_iterations=2,
    max_inference_iterations=4,
    convergence_tol=1e-4,
    target_encoder_kwargs=dict(d_layers=(16,), d_embedding=4, numeric_embedding="linear"),
    context_encoder_kwargs=dict(d_layers=(8,), d_embedding=2, numeric_embedding="linear"),
)


def rows(rng, lead, feats):
  cats = [rng.integers(0, c, size=lead) for c in feats.cat_cardinalities]
  return {
      "numeric": rng.normal(size=lead + (feats.num_numeric,)).astype(np.float32),
      "numeric_missing": rng.random(lead + (feats.num_numeric,)) < 0.1,
      "categorical": (np.stack(cats, -1) if cats else np.zeros(lead + (0,))).astype(np.int32),
  }


def make_inputs(seed=0, b=B):
  rng = np.random.default_rng(seed)
  contexts = {}
  for name, _, m, feats in CONTEXTS:
    c = rows(rng, (b, m), feats)
    c["mask"] = rng.random((b, m)) < 0.7
    c["ages"] = (rng.random((b, m)) * 48).astype(np.float32)
    contexts[name] = c
  return rows(rng, (b,), TARGET), contexts


def make_model(**kw):
  return NexusFormer(
      TARGET,
      tuple(c[3] for c in CONTEXTS),
      tuple(c[0] for c in CONTEXTS),
      tuple(c[1] for c in CONTEXTS),
      **{**SMALL, **kw},
  )


def copy(tree):
  return jax.tree.map(np.array, tree)


@pytest.fixture(scope="module")
def base():
  """(model, variables, target, contexts, apply) with `apply(variables, target, contexts)` jitted once."""
  target, contexts = make_inputs()
  model = make_model()
  variables = jax.jit(lambda k: nn.unbox(model.init(k, target, contexts)))(jax.random.key(0))
  apply = jax.jit(lambda v, t, c: model.apply(v, t, c))
  return model, variables, target, contexts, apply


def with_recycle(variables, value):
  params = jax.tree.map(lambda x: x, variables["params"])
  kernel = params["refiner"]["recycle"]["kernel"]
  params["refiner"]["recycle"]["kernel"] = value * jax.random.normal(
      jax.random.key(3), kernel.shape
  )
  return {**variables, "params": params}


def test_shapes_aux_masks_and_training_gradients(base):
  model, variables, target, contexts, apply = base
  out, aux = apply(variables, target, contexts)
  assert out.shape == (B, 1) and out.dtype == jnp.float32 and np.isfinite(out).all()
  assert aux["context_attention"].shape == (B, 3) and aux["fusion_gates"].shape == (B, 3)
  assert aux["pool_attention"]["hist.k=k"].shape == (B, 5) and aux["pool_attention"][
      "other.k=k"
  ].shape == (B, 3)
  np.testing.assert_array_equal(
      aux["context_present"], np.stack([c["mask"].any(1) for c in contexts.values()], 1)
  )
  # Pooling weights: 0 on masked rows, sum to 1 over the valid rows of non-empty contexts.
  pa, mask = np.asarray(aux["pool_attention"]["hist.k=k"]), contexts["hist.k=k"]["mask"]
  assert np.all(pa[~mask] == 0)
  np.testing.assert_allclose(pa.sum(1)[mask.any(1)], 1.0, rtol=1e-5)

  def loss(p):
    out, aux = model.apply(
        {"params": p}, target, contexts, train=True, rngs={"dropout": jax.random.key(1)}
    )
    return out.sum(), aux["iterations"]

  grads, iterations = jax.jit(jax.grad(loss, has_aux=True))(with_recycle(variables, 3.0)["params"])
  flat = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in flat) and sum(float(jnp.abs(g).sum()) for g in flat) > 0
  np.testing.assert_array_equal(iterations, 2)  # training always runs exactly R iterations


def test_absent_context_is_ignored(base):
  """A context with no rows (all masked) must not influence anything, whatever its padding holds."""
  _, variables, target, contexts, apply = base
  contexts = copy(contexts)
  contexts["hist.k=k"]["mask"][0] = False
  changed = copy(contexts)
  changed["hist.k=k"]["numeric"][0] = 1e3 * np.random.default_rng(1).normal(size=(5, 4))
  changed["hist.k=k"]["categorical"][0] = 5
  changed["hist.k=k"]["ages"][0] = 7.0
  (out_a, aux_a), (out_b, _) = apply(variables, target, contexts), apply(variables, target, changed)
  np.testing.assert_allclose(out_a, out_b, rtol=1e-6, atol=1e-6)
  assert (
      float(aux_a["context_attention"][0, 1]) == 0.0 and float(aux_a["fusion_gates"][0, 1]) == 0.0
  )
  assert not bool(aux_a["context_present"][0, 1])


def test_refinement_stops_early_on_converged_inputs(base):
  _, variables, target, contexts, apply = base
  # The recycling projection starts at zero: iteration 2 reproduces iteration 1 -> converged, stop at 2 of 4.
  _, aux = apply(variables, target, contexts)
  np.testing.assert_array_equal(aux["iterations"], 2)
  assert float(np.max(aux["refine_change"])) < 1e-4
  # Strong recycling does not settle within the tolerance: all 4 iterations run.
  _, aux = apply(with_recycle(variables, 3.0), target, contexts)
  np.testing.assert_array_equal(aux["iterations"], 4)


def test_adaptive_refinement_is_per_example(base):
  """A row's prediction does not depend on its batch mates (converged rows are frozen)."""
  _, variables, target, contexts, apply = base
  variables = with_recycle(variables, 0.2)
  out, aux = apply(variables, target, contexts)
  other_t, other_c = make_inputs(seed=7)
  put = lambda a, b: np.concatenate([b[:3], a[2:3], b[4:]])  # noqa: E731  row 2 of `a` at position 3
  mixed_t, mixed_c = jax.tree.map(put, target, other_t), jax.tree.map(put, contexts, other_c)
  out2, aux2 = apply(variables, mixed_t, mixed_c)
  np.testing.assert_allclose(out[2], out2[3], rtol=1e-5, atol=1e-5)
  assert int(aux["iterations"][2]) == int(aux2["iterations"][3])
  assert len(set(np.asarray(aux2["iterations"]).tolist())) >= 1


def test_bfloat16_compute(base):
  _, variables, target, contexts, apply = base
  ref, _ = apply(variables, target, contexts)
  out, _ = jax.jit(lambda v: make_model(dtype=jnp.bfloat16).apply(v, target, contexts))(variables)
  assert out.dtype == jnp.float32 and np.isfinite(out).all()
  np.testing.assert_allclose(out, ref, atol=0.15)


def test_zero_prior_removes_context_and_top_k_gating(base):
  _, variables, target, contexts, _ = base  # gating options add no params: the base variables fit
  model = make_model(context_priors=(1.0, 0.0, 2.0), top_k_contexts=1)
  apply = jax.jit(lambda c: model.apply(variables, target, c))
  changed = copy(contexts)
  changed["hist.k=k"]["numeric"] += 5.0
  (a, aux), (b, _) = apply(contexts), apply(changed)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  present = np.asarray(aux["context_present"])
  assert not present[:, 1].any()
  others = np.stack([contexts[n]["mask"].any(1) for n in ("k->parent", "other.k=k")], 1).any(1)
  np.testing.assert_array_equal(
      present.sum(1), others.astype(int)
  )  # top-1 of the remaining contexts


def test_joined_target_reads_row_zero_of_each_context():
  """join_context_rows: the target encoder reads row 0 of every context (absent rows as missing).

  With the history context's prior at 0 (removed from cross-table attention) the output still depends
  on its row 0 through the join -- and not on its later rows, nor on row 0 once that row is masked.
  """
  target, contexts = make_inputs(seed=1)
  contexts["hist.k=k"]["mask"][:, 0] = True
  model = make_model(join_context_rows=True, context_priors=(1.0, 0.0, 1.0))
  variables = jax.jit(lambda k: nn.unbox(model.init(k, target, contexts)))(jax.random.key(0))
  joined_inputs = 3 + 2 + 4 + 2  # numeric features of the target + every context's row 0
  layout = model._joined_target(target, contexts)[0]
  assert layout.num_numeric == joined_inputs and layout.cat_cardinalities == (5, 4, 3, 6)
  apply = jax.jit(lambda c: model.apply(variables, target, c)[0])
  base_out = apply(contexts)
  row0, later, masked0 = copy(contexts), copy(contexts), copy(contexts)
  row0["hist.k=k"]["numeric"][:, 0] += 3.0
  later["hist.k=k"]["numeric"][:, 1:] += 3.0
  masked0["hist.k=k"]["mask"][:, 0] = False
  masked_out = apply(masked0)
  masked0["hist.k=k"]["numeric"][:, 0] += 3.0
  assert np.abs(np.asarray(apply(row0) - base_out)).max() > 1e-4
  np.testing.assert_allclose(apply(later), base_out, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(apply(masked0), masked_out, rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_context(base):
  model, variables, target, contexts, _ = base
  with pytest.raises(ValueError, match="absent: \\['other.k=k'\\]"):
    model.apply(variables, target, {k: v for k, v in contexts.items() if k != "other.k=k"})
  bad = {
      **contexts,
      "hist.k=k": {**contexts["hist.k=k"], "numeric": contexts["hist.k=k"]["numeric"][..., :2]},
  }
  with pytest.raises(ValueError, match="context 'hist.k=k' \\(table 'hist'\\) numeric"):
    model.apply(variables, target, bad)


def test_learns_signal_that_lives_only_in_a_history_context():
  """The label is the sign of the mean of one history column: only pooling over that context can find it."""
  n = 128
  target, contexts = make_inputs(seed=4, b=n)
  h = contexts["hist.k=k"]
  h["mask"][:, 0] = True
  y = ((h["numeric"][..., 0] * h["mask"]).sum(1) > 0).astype(np.float32)
  model = make_model(dropout=0.0)
  params = jax.jit(lambda k: nn.unbox(model.init(k, target, contexts)))(jax.random.key(0))["params"]
  tx = optax.adam(3e-3)

  def loss_fn(p):
    out, _ = model.apply(
        {"params": p}, target, contexts, train=True, rngs={"dropout": jax.random.key(0)}
    )
    return optax.sigmoid_binary_cross_entropy(out[:, 0], y).mean()

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    return jax.lax.scan(step, (params, tx.init(params)), None, length=120)[1]

  losses = train(params)
  assert float(losses[0]) > 0.6 and float(losses[-10:].mean()) < 0.35


def test_unknown_encoder_kwarg_fails_naming_key_encoder_and_fields():
  target, contexts = make_inputs()
  init = lambda model: jax.eval_shape(  # noqa: E731  tracing is enough: no compile
      lambda: model.init(jax.random.key(0), target, contexts)
  )
  with pytest.raises(
      ValueError,
      match=r"target_encoder_kwargs: encoder 'mlp' \(MLP\) has no hyperparameter\(s\) \['d_layer'\]"
      r"; it accepts: d_embedding, d_layers, dropout, numeric_embedding, plr_frequencies, plr_sigma",
  ):
    init(make_model(target_encoder_kwargs=dict(d_layer=(16,))))
  with pytest.raises(
      ValueError, match=r"context_encoder_kwargs \(context 'k->parent'\).*\['plr_frequency'\]"
  ):
    init(make_model(context_encoder_kwargs=dict(d_layers=(8,), plr_frequency=3)))
  with pytest.raises(ValueError, match=r"has no hyperparameter\(s\) \['d_out'\]"):
    init(make_model(target_encoder_kwargs=dict(d_out=3)))  # set by NexusFormer itself


def test_context_encoder_kwargs_per_context():
  target, contexts = make_inputs()
  model = make_model(
      context_encoders=("lean_mlp", "mlp", "lean_mlp"),
      context_encoder_kwargs=(
          dict(d_layers=[8]),  # lists become tuples
          dict(d_layers=(8,), numeric_embedding="linear"),
          dict(d_layers=(4,), d_embedding=3),
      ),
  )
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), target, contexts)))
  params = params["params"]
  assert params["encoder_parent"]["layer0"]["kernel"].shape[1] == 8
  assert params["encoder_other"]["layer0"]["kernel"].shape[1] == 4
  assert "tokenizer" in params["encoder_hist"]  # the mlp
  with pytest.raises(ValueError, match="has 2 entries for 3 contexts"):
    jax.eval_shape(
        lambda: make_model(context_encoder_kwargs=({}, {})).init(
            jax.random.key(0), target, contexts
        )
    )


def test_linear_head_starts_as_the_deep_model_and_is_linear_in_the_target_row(base):
  _, variables, target, contexts, apply = base
  wide = make_model(linear_head=True)
  wide_vars = nn.unbox(wide.init(jax.random.key(0), target, contexts))
  extra = set(wide_vars["params"]) - set(variables["params"])
  assert extra == {"linear_numeric", "linear_categorical"}
  deep = {"params": {k: v for k, v in wide_vars["params"].items() if k not in extra}}
  np.testing.assert_allclose(  # zero init: the same function as without the wide part
      wide.apply(wide_vars, target, contexts)[0], apply(deep, target, contexts)[0], atol=1e-6
  )
  rng = np.random.default_rng(1)
  p = copy(wide_vars)
  p["params"]["linear_numeric"]["kernel"] = rng.normal(size=(2 * TARGET.num_numeric, 1))
  p["params"]["linear_numeric"]["bias"] = np.array([0.5])
  table = rng.normal(size=(sum(TARGET.cat_cardinalities), 1))
  p["params"]["linear_categorical"] = table
  x = np.concatenate([target["numeric"], target["numeric_missing"]], -1)
  codes = target["categorical"] + np.array([0, TARGET.cat_cardinalities[0]])
  want = x @ p["params"]["linear_numeric"]["kernel"] + 0.5 + table[codes].sum(1)
  got = wide.apply(p, target, contexts)[0] - apply(deep, target, contexts)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
