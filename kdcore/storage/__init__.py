"""What a run leaves on disk: the run folder (never overwritten, one run holds it), resume checks,
and checkpoints (JSON, safetensors, DCP shards read through an allow-list, HF export). See
docs/architecture.md."""
