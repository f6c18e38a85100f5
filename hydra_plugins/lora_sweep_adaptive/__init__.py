"""lora-sweep's adaptive rank sweep, a Hydra Sweeper plugin (conf/hydra/sweeper/adaptive.yaml)."""
