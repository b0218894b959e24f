"""Inputs: what the user named, resolved to checkpoints in order (paths, globs, folders, the Hub),
with their steps, the selection among them, and the side files of a model folder."""
