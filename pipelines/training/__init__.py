"""The training job: its config, the driver, the per-worker loop and its components."""
