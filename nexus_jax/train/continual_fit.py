"""Continual learning through the trainer: one `fit` per domain, EWC consolidated between them.

    result = run_domains(objective, config, workdir)   # config.continual.domains = "a,b,c"

Domain i is the corpus under `<data.root or the stdlib>/<domain>` (its own file-hash split with
`continual.valid_fraction` / `continual.test_fraction`; one tokenizer, `workdir/tokenizer.json`,
trained on the first domain). Domain i is trained by `train/loop.fit` in
`workdir/continual/<i>_<domain>`, starting from the best params of domain i - 1 (a fresh
optimizer state each time: the domains are separate runs, each resumable on its own). Then:
  EWC (`config.optim.ewc_lambda > 0`; online with `optim.ewc_online`): the diagonal Fisher
    (`train/fisher.py`, `continual.fisher_variant`) of `continual.fisher_examples` training
    windows of domain i is consolidated into the EWC state of the best checkpoint
    (`train/ewc.consolidated`) and saved as `ewc_after_<i>.npz`; domain i + 1's config gets
    `optim.ewc_prior` = that file, so its `build_optimizer` starts the EWC state from it.
  replay (`continual.replay_capacity > 0`): domain i's training windows stream into a reservoir
    (`train/replay.py`); in every later domain the last `round(replay_fraction * batch_size)`
    rows of each batch are replaced by stored windows (batch size unchanged; deterministic per
    step, so a resumed run sees the same batches).
After every domain the model is scored on every domain's test bytes: `matrix[i][j]` = bits/byte
on domain j after training domain i (lower is better, so backward transfer > 0 is forgetting),
and on every domain's validation bytes (`valid_matrix`, the same layout; for choosing
hyper-parameters such as `optim.ewc_lambda` without looking at the test bytes).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.data.datasets import text
from nexus_jax.data.datasets.byte_lm import LMData, load_lm_data
from nexus_jax.train.continual import (
    backward_transfer,
    forgetting,
    logits_fn_of,
)
from nexus_jax.train.data import ArrayDataset
from nexus_jax.train.ewc import consolidated, find_ewc_state, save_ewc_prior
from nexus_jax.train.fisher import check_variant, diagonal_fisher
from nexus_jax.train.loop import fit, restore_best
from nexus_jax.train.replay import ReservoirBuffer
from nexus_jax.train.steps import Objective


def parse_domains(config: Any) -> list[str]:
  """The domain folder names of `config.continual.domains` ("" / absent: [])."""
  cc = config.get("continual", None)
  raw = cc.get("domains", "") if cc is not None else ""
  if isinstance(raw, (list, tuple)):
    raw = ",".join(raw)
  return [d.strip() for d in str(raw).split(",") if d.strip()]


def check_continual_config(config: Any) -> list[str]:
  """Validates `config.continual` (ValueError naming the field); returns the domains."""
  domains = parse_domains(config)
  if not domains:
    return []
  cc = config.continual
  if len(set(domains)) != len(domains):
    raise ValueError(f"config.continual.domains={cc.domains!r} names a domain twice.")
  if len(domains) < 2:
    raise ValueError(
        f"config.continual.domains={cc.domains!r} names one domain; continual learning needs "
        ">= 2 (comma-separated folder names)."
    )
  frac = float(cc.get("replay_fraction", 0.25))
  if not 0.0 <= frac < 1.0:
    raise ValueError(f"config.continual.replay_fraction={frac} must lie in [0, 1).")
  if int(cc.get("replay_capacity", 0)) < 0:
    raise ValueError(
        f"config.continual.replay_capacity={cc.replay_capacity} must be >= 0 (0 = no replay)."
    )
  if int(cc.get("fisher_examples", 1)) < 1:
    raise ValueError(f"config.continual.fisher_examples={cc.fisher_examples} must be >= 1.")
  try:
    check_variant(cc.get("fisher_variant", "sampled"))
  except ValueError as e:
    raise ValueError(f"config.continual.fisher_variant: {e}") from None
  if config.data.get("tokenizer", "byte") != "byte":
    raise ValueError(
        f"config.continual.domains needs config.data.tokenizer='byte' (got "
        f"{config.data.tokenizer!r}): a BPE trained on the first domain would tokenize the others."
    )
  return domains


def lm_targets(batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
  """Next-token labels and weights of an LM batch `{"tokens" [B, T+1], ("mask")}`."""
  tokens = batch["tokens"]
  mask = batch.get("mask", jnp.ones_like(tokens))
  return tokens[:, 1:], mask[:, 1:].astype(jnp.float32)


class ReplayDataset(ArrayDataset):
  """`base`'s training batches with their last `n` rows replaced by reservoir samples."""

  def __init__(self, base: ArrayDataset, buffer: ReservoirBuffer, n: int, seed: int):
    super().__init__(base.arrays, base.batch_size, base.seed)
    self.buffer, self.n, self.replay_seed = buffer, int(n), int(seed)

  def train_batch(self, step: int) -> Any:
    batch = super().train_batch(step)
    if self.buffer.size == 0 or self.n == 0:
      return batch
    stored = self.buffer.sample(self.n, np.random.default_rng([self.replay_seed, int(step)]))
    out = dict(batch)
    out["tokens"] = np.concatenate([batch["tokens"][: -self.n], stored["tokens"]])
    return out


@dataclasses.dataclass
class DomainsResult:
  domains: list[str]
  matrix: np.ndarray  # [T, T] test bits/byte on domain j after training domain i
  valid_matrix: np.ndarray  # [T, T] the same on each domain's validation windows
  state: Any  # the TrainState after the last domain (best checkpoint)
  fit_results: list[Any]
  data: list[LMData]

  def report(self) -> dict[str, Any]:
    """results.json's `continual` section."""
    r = self.matrix
    return {
        "domains": self.domains,
        "bits_per_byte_matrix": np.round(r, 4).tolist(),
        "valid_bits_per_byte_matrix": np.round(self.valid_matrix, 4).tolist(),
        "average_valid_bits_per_byte": round(float(np.mean(self.valid_matrix[-1])), 4),
        "final_bits_per_byte": dict(zip(self.domains, np.round(r[-1], 4).tolist())),
        "average_bits_per_byte": round(float(np.mean(r[-1])), 4),
        # mean over earlier domains of R[T-1, j] - R[j, j]: > 0 is forgetting (bits are a loss)
        "backward_transfer": round(backward_transfer(r), 4),
        # mean over earlier domains of R[T-1, j] - min_{l < T-1} R[l, j] (the loss rise)
        "forgetting": round(forgetting(-r), 4),
        "best_steps": [f.best_step for f in self.fit_results],
    }


def domain_config(config: Any, root: pathlib.Path, domain: str) -> Any:
  """`config` with `data.root` = root/domain and the continual split fractions."""
  cfg = copy.deepcopy(config)
  cc = config.continual
  with cfg.unlocked():
    cfg.data.root = str(root / domain)
    cfg.data.valid_fraction = float(cc.get("valid_fraction", 0.2))
    cfg.data.test_fraction = float(cc.get("test_fraction", 0.2))
  return cfg


def run_domains(
    make_objective: Callable[[], Objective],
    config: Any,
    workdir: str | pathlib.Path,
    *,
    test_metric: str = "loss",
    init_params: Any = None,
) -> DomainsResult:
  """Trains `config.continual.domains` in sequence (module docstring)."""
  domains = check_continual_config(config)
  if not domains:
    raise ValueError("config.continual.domains is empty: name >= 2 comma-separated folders.")
  workdir = pathlib.Path(workdir)
  root = pathlib.Path(config.data.root) if config.data.root else text.stdlib_dir()
  missing = [d for d in domains if not (root / d).is_dir()]
  if missing:
    raise ValueError(f"config.continual.domains: {missing} are not folders under {root}.")
  cc = config.continual
  configs = [domain_config(config, root, d) for d in domains]
  data = [load_lm_data(c, workdir) for c in configs]
  objective = make_objective()
  capacity = int(cc.get("replay_capacity", 0))
  buffer = ReservoirBuffer(capacity, int(config.seed)) if capacity else None
  n_replay = round(float(cc.get("replay_fraction", 0.25)) * int(config.train.batch_size))
  ewc_on = float(config.optim.get("ewc_lambda", 0.0)) > 0
  prior_path = ""
  params = init_params
  n = len(domains)
  matrix, valid_matrix = np.zeros((n, n)), np.zeros((n, n))
  fits = []
  for i, (domain, cfg, d) in enumerate(zip(domains, configs, data)):
    run_dir = workdir / "continual" / f"{i}_{domain}"
    if ewc_on:
      with cfg.unlocked():
        cfg.optim.ewc_prior = prior_path
    train = d.train
    if buffer is not None and n_replay:
      train = ReplayDataset(train, buffer, n_replay, int(config.seed) * 1000 + i)
    result = fit(objective, train, d.valid, cfg, run_dir, init_params=params)
    state = restore_best(result)
    fits.append(result)
    for j, other in enumerate(data):
      matrix[i, j] = other.test_bits_per_byte(
          lambda ds: result.trainer.evaluate(state, ds)[0][test_metric]
      )
      valid_nats = result.trainer.evaluate(state, other.valid)[0][test_metric]
      valid_matrix[i, j] = float(valid_nats) / (math.log(2.0) * other.bytes_per_token["valid"])
    if ewc_on and i < n - 1:
      rows = d.train.arrays["tokens"][: int(cc.get("fisher_examples", 256))]
      fisher = diagonal_fisher(
          logits_fn_of(objective),
          state.params,
          {"tokens": rows},
          lm_targets,
          variant=cc.get("fisher_variant", "sampled"),
          rng=jax.random.PRNGKey(int(config.seed) * 1000 + i),
          chunk_size=16,
          context=state.extra,
      )
      merged = consolidated(find_ewc_state(state.opt_state), state.params, fisher)
      prior_path = str(save_ewc_prior(workdir / "continual" / f"ewc_after_{i}.npz", merged))
    if buffer is not None:
      buffer.add({"tokens": d.train.arrays["tokens"]})
    params = jax.device_get(state.params)
  return DomainsResult(domains, matrix, valid_matrix, state, fits, data)


__all__ = [
    "DomainsResult",
    "ReplayDataset",
    "check_continual_config",
    "domain_config",
    "lm_targets",
    "parse_domains",
    "run_domains",
]
