"""validate_train_config: every bad training setting is refused, naming its field."""

import math

import ml_collections
import pytest

from nexus_jax.train.config import base_config, validate_train_config


def test_defaults_are_valid():
  validate_train_config(base_config())


@pytest.mark.parametrize(
    "path, value",
    [
        ("optim.learning_rate", math.nan),
        ("optim.learning_rate", math.inf),
        ("optim.learning_rate", 0.0),
        ("optim.learning_rate", -1e-3),
        ("optim.learning_rate", "1e-3"),
        ("train.batch_size", 0),
        ("train.batch_size", -8),
        ("train.num_steps", -1),
        ("train.num_epochs", -1),
        ("optim.warmup_steps", -5),
        ("optim.grad_accum_steps", 0),
        ("optim.clip_norm", -1.0),
        ("optim.weight_decay", -1e-4),
        ("optim.weight_decay", math.nan),
    ],
)
def test_bad_value_is_refused_naming_the_field(path, value):
  c = ml_collections.ConfigDict(base_config().to_dict(), type_safe=False)
  section, name = path.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=rf"config\.{path}=") as info:
    validate_train_config(c)
  assert len(str(info.value).splitlines()) == 2  # header + this one field


def test_zero_steps_and_zero_epochs_would_train_nothing():
  c = base_config()
  c.train.num_steps, c.train.num_epochs = 0, 0
  with pytest.raises(ValueError, match="nothing would be trained"):
    validate_train_config(c)
  c.train.num_steps = 10  # explicit steps: epochs are ignored
  validate_train_config(c)


def test_every_problem_is_listed_and_missing_fields_are_skipped():
  c = base_config()
  c.optim.learning_rate, c.train.batch_size, c.train.early_stopping.mode = -1.0, 0, "maximum"
  with pytest.raises(ValueError) as info:
    validate_train_config(c)
  message = str(info.value)
  for field in ("optim.learning_rate", "train.batch_size", "train.early_stopping.mode"):
    assert f"config.{field}=" in message
  minimal = ml_collections.ConfigDict(
      {"train": {"batch_size": 4, "num_epochs": 1}, "optim": {"learning_rate": 1e-3}}
  )
  validate_train_config(minimal)
