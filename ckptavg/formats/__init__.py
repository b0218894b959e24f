"""Formats: one `Checkpoint` over every layout (safetensors, torch files, shards), dtype tables,
and the checked reading of torch archives."""
