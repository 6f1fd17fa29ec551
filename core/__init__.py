"""cocomix.core: the ground floor: errors, logs, progress, config-as-flags, workspace, the unbiased
LayerNorm. It imports nothing else of cocomix; every other folder builds on it."""
