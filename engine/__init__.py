"""Computation core of gkp-workbench: checkpoints, models, smoothness, grouped kernel pruning,
training and robustness evaluation. Never imports Textual or Rich."""
