"""Experiments: `python -m experiments.run --config configs/<name>.py`. See `experiments/registry.py`."""
