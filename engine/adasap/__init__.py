"""AdaSAP (SPEC §9): the adaptive per-filter sharpness-aware step and its warmup stage, the
progressive pruning schedule that re-plans with any workbench method, and the sharpness
estimate reported around pruning. May import every engine package up to `training` (and
`baselines`, `gkp`); `config`, `pipeline` and `report` sit above."""
