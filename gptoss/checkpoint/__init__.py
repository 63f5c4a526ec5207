"""The on-disk format of checkpoints, apart from any live engine: the files of one tag, `latest`, train_state.json
and the run's chain (`layout`), the manifest that lets a tag prove itself before it is loaded (`manifest`), reading
a tag offline into a full state dict for export and sampling (`read`), and the lock that keeps a run dir to one
writer (`lock`). Saving and restoring a running engine is the trainer's (`gptoss.train.save`, `.resume`)."""
