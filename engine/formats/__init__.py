"""The files users bring and the workbench writes: checkpoints (state dicts, whole-model
pickles read without running code, the workbench's own self-describing format) and TMI training
snapshots. May import `engine.common`, `engine.models` and `engine.gkp` (a pruned checkpoint
carries its plan)."""
