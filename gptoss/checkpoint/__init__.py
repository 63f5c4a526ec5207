"""Checkpoints: the files of one save (`layout`), what travels with it (`state`), writing one during training
(`save`), restoring one into a running engine (`resume`), and reading one offline into a full state dict for
export and sampling (`read`)."""
