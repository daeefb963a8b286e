"""Pretrained Llama / Mistral / Mixtral weights from Hugging Face safetensors (no torch needed).

`load_pretrained` / `import_hf` / `export_safetensors` (`convert.py`), `read_hf_config`
(`hf_config.py`), the declarative name map (`key_map.py`), the safetensors reader / writer
(`safetensors_io.py`). The tokenizer must be the one the weights were trained with: tokenizers
are not converted and token ids go in as they are.
"""

from nexus_jax.models.pretrained.convert import (
    LoadReport,
    export_safetensors,
    import_hf,
    load_pretrained,
)
from nexus_jax.models.pretrained.hf_config import check_convertible, hf_config_of, read_hf_config

__all__ = [
    "LoadReport",
    "check_convertible",
    "export_safetensors",
    "hf_config_of",
    "import_hf",
    "load_pretrained",
    "read_hf_config",
]
