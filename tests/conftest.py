"""Suite-wide test settings.

Hypothesis runs derandomized by default so CI on a clean clone sees the same examples as a
developer's machine; `pytest --hypothesis-profile=explore` searches fresh random examples.
"""
from hypothesis import settings

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=500)
settings.load_profile("default")
