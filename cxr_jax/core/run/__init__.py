"""What a run needs around the model: its directory, checkpoints, lock, writers and CSV tables,
config checks, platform and devices, multi-host sync, preemption, sharding, utilisation and
progress."""
