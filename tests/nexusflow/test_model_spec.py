"""model_spec: the JSON spec an artifact stores rebuilds the same model (same param tree)."""

import json

import flax.linen as nn
import pytest
import jax

from nexus_jax.nexusflow.model_spec import build_nexus_former
from nexus_jax.train.checkpoint import fingerprint


def _init_tree(model, example):
  target, contexts = example
  return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), target, contexts))["params"])


def test_spec_json_round_trip_rebuilds_the_same_param_tree(fitted):
  from nexus_jax.nexusflow.artifact import _example

  predictor = fitted.predictor_
  spec = json.loads(json.dumps(predictor.spec))  # what artifact.json stores
  rebuilt = build_nexus_former(spec)
  example = _example(predictor)
  assert fingerprint(_init_tree(rebuilt, example)) == fingerprint(predictor.variables["params"])
  one = {k: v for k, v in spec.items() if k not in ("ensemble_size", "ensemble_mode")}
  ensemble = build_nexus_former({**one, "ensemble_size": 2, "task": "binary"})  # an old spec
  tree = _init_tree(ensemble, example)
  assert set(tree) == {"member_0", "member_1"}
  member = build_nexus_former(one)
  assert fingerprint(tree["member_1"]) == fingerprint(_init_tree(member, example))
  batched = build_nexus_former(
      {**one, "ensemble_size": 3, "task": "binary", "ensemble_mode": "batched"}
  )
  tree = _init_tree(batched, example)
  assert set(tree) == {"members"}
  assert jax.tree.map(lambda a: a.shape, tree["members"]) == jax.tree.map(
      lambda a: (3, *a.shape), _init_tree(member, example)
  )
  with pytest.raises(ValueError, match="spec ensemble_mode='parallel'"):
    build_nexus_former({**one, "ensemble_size": 2, "task": "binary", "ensemble_mode": "parallel"})
