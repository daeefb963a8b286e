"""Console scripts: `nexusflow` (tabular) and `nexus-lm` (language models)."""
