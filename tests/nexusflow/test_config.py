"""NexusFlow's default config: generic library defaults, dataset specifics in configs/tabular.py."""

import importlib.util
import pathlib

import pytest

from nexus_jax.nexusflow.config import PRESETS, tabular_config
from nexus_jax.nexusflow.schedule import scale_schedule
from nexus_jax.train.presets import get_path

ROOT = pathlib.Path(__file__).resolve().parents[2]


def config_file():
  spec = importlib.util.spec_from_file_location("tabular_config", ROOT / "configs" / "tabular.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_file_is_the_library_config_plus_the_bundled_dataset():
  module = config_file()
  c, lib = module.get_config(), tabular_config()
  assert c.model.name == "nexus_former" and c.preset == "quick" and c.experiment == "tabular"
  assert c.data.name == "nycflights13" and lib.data.name == ""
  assert set(c.model.encoders) - set(lib.model.encoders) == set(module.NYCFLIGHTS13_TABLES)
  assert module.PRESETS is PRESETS  # the estimator's presets, held beside get_config()


def test_library_defaults_name_no_dataset():
  text = tabular_config().to_json()
  for name in ("flights", "weather", "planes", "airports", "nycflights13"):
    assert name not in text


def test_preset_paths_exist():
  for path in PRESETS["full"]:
    get_path(tabular_config(), path)


@pytest.mark.parametrize(
    "n_train, batch, steps, warmup, every",
    [
        (273_355, 512, 1599, 159, 399),  # 273k rows: 3 epochs within 1600, warmup capped at 10%
        (17_172, 512, 660, 66, 33),  # mid-size (lahman_salary): 20 epochs of 33 steps, under 1600
        (56_523, 512, 1540, 154, 110),  # larger (lahman_allstar): 14 whole epochs fit in 1600
        (200, 50, 400, 40, 20),  # a small folder: 4 steps per epoch, min_steps 400, 20 evaluations
        (5, 5, 400, 40, 20),  # tiny: the batch never exceeds the rows
    ],
)
def test_schedule_scales_to_the_data(n_train, batch, steps, warmup, every):
  c = tabular_config()
  c.model.ensemble_size = 1  # one model (the batched ensemble's rule: the next test)
  out = scale_schedule(c, n_train)
  assert (c.train.batch_size, c.train.num_steps, c.optim.warmup_steps) == (batch, steps, warmup)
  assert c.train.eval_every_steps == every and out["num_steps"] == steps
  # patience covers at least a quarter of the run's evaluations (2 stays 2 for nycflights13)
  assert c.train.early_stopping.patience == max(2, -(-steps // (4 * every)))


@pytest.mark.parametrize(
    "n_train, members, batch, steps, split",
    [
        (273_355, 2, 512, 1599, True),  # 3 epochs in 1600 steps: 2 members see 1.5 each
        (56_523, 4, 512, 1540, True),  # 14 epochs: 4 members see 3.5 each; 1540 > 3 x 441
        (17_172, 4, 512, 1474, True),  # members: 134 steps an epoch, 11 whole ones within 1600
        (12_803, 4, 512, 1600, True),  # members: 100 steps an epoch, 16 within 1600 (one: 500)
        (2_403, 4, 512, 400, True),  # small: min_steps wins
        (200, 4, 48, 400, True),  # 50 rows a batch rounded down to 4 members x 12
        (3, 3, 3, 400, True),  # 3 rows: members capped by the rows of a batch
    ],
)
def test_batched_ensemble_members_and_budget(n_train, members, batch, steps, split):
  c = tabular_config()
  assert (c.model.ensemble_size, c.model.ensemble_mode) == (4, "batched")
  out = scale_schedule(c, n_train)
  assert (out["ensemble_size"], c.model.ensemble_size) == (members, members)
  assert (c.train.batch_size, c.train.num_steps, out["split_members"]) == (batch, steps, split)
  c = tabular_config()
  c.model.min_member_epochs = 0  # 0: always ensemble_size
  assert scale_schedule(c, 273_355)["ensemble_size"] == 4
  c = tabular_config()
  c.model.ensemble_mode = "sequential"  # each member trains the whole schedule: no rule
  out = scale_schedule(c, 17_172)  # nor a split batch or a member-epoch budget
  assert (out["ensemble_size"], out["split_members"]) == (4, False)
  assert (out["batch_size"], out["num_steps"]) == (512, 660)  # as one model's schedule
  c = tabular_config()
  c.model.min_member_epochs = -1.0
  with pytest.raises(ValueError, match="model.min_member_epochs=-1.0"):
    scale_schedule(c, 1000)


def test_member_batch_floor():
  c = tabular_config()
  c.model.min_member_batch = 32  # 50 rows a batch: 12 per member < 32, every member on all 50
  out = scale_schedule(c, 200)
  assert (out["split_members"], out["batch_size"], out["ensemble_size"]) == (False, 50, 4)
  c = tabular_config()
  c.model.min_member_batch = 128  # 512 / 4 = 128 rows per member: still split
  assert scale_schedule(c, 2_403)["split_members"]
  c = tabular_config()
  c.model.min_member_batch = 129
  out = scale_schedule(c, 2_403)
  assert (out["split_members"], out["batch_size"]) == (False, 512)
  c = tabular_config()
  c.model.min_member_batch = -1
  with pytest.raises(ValueError, match="model.min_member_batch=-1"):
    scale_schedule(c, 1000)


def test_nycflights13_main_job_keeps_one_epoch_of_one_model():
  from configs import tabular

  c = tabular.get_config()
  out = scale_schedule(c, 273_355)  # 800 steps: one epoch, a quarter epoch per member -> one
  assert (out["num_steps"], out["ensemble_size"], out["split_members"]) == (533, 1, False)


def _one_model():
  c = tabular_config()
  c.model.ensemble_size = 1
  return c


def test_epoch_budget_rule():
  c = _one_model()
  c.train.min_epochs, c.train.max_repeat_steps, c.train.min_steps = 3, 100, 1
  assert scale_schedule(c, 512 * 30)["num_steps"] == 90  # 3 epochs of 30 steps fit in 100
  c = _one_model()
  c.train.min_epochs, c.train.max_repeat_steps, c.train.min_steps = 3, 100, 1
  assert scale_schedule(c, 512 * 60)["num_steps"] == 60  # one whole epoch, never a cut one
  c = _one_model()
  c.train.min_epochs, c.train.max_repeat_steps, c.train.min_steps = 3, 0, 1
  assert scale_schedule(c, 512 * 60)["num_steps"] == 180  # 0 = no cap
  c = _one_model()
  c.train.min_epochs, c.train.min_steps = 0, 1
  assert scale_schedule(c, 512 * 30)["num_steps"] == 30  # 0 = no budget: num_epochs only
  c = _one_model()
  c.train.min_steps = 0
  assert scale_schedule(c, 512 * 30)["num_steps"] == 30  # min_steps 0: exactly num_epochs
  c = _one_model()
  c.train.max_repeat_steps = -1
  with pytest.raises(ValueError, match="train.max_repeat_steps=-1"):
    scale_schedule(c, 1000)


def test_explicit_steps_win_and_zero_steps_fail():
  c = tabular_config()
  c.train.num_steps = 7
  assert scale_schedule(c, 200)["num_steps"] == 7  # not replaced by min_steps
  c = tabular_config()
  c.train.num_epochs = 0
  with pytest.raises(ValueError, match="num_epochs=0 with train.num_steps=0"):
    scale_schedule(c, 1000)
  with pytest.raises(ValueError, match="no rows"):
    scale_schedule(tabular_config(), 0)
