"""The BatchNorm pass: a model built from a spec, batches from data, torch's `update_bn`."""
