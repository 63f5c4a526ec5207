"""Checkpoints: the files of one save (`layout`), what travels with it (`state`), writing one during training
(`save`), the manifest that lets a checkpoint prove itself before it is loaded (`manifest`), restoring one into a
running engine (`resume`), reading one offline into a full state dict for export and sampling (`read`), and the
lock that keeps a run dir to one writer (`lock`)."""
