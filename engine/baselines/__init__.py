"""Pruning methods GKP is compared against: L1-norm filter pruning. May import `engine.common`,
`engine.models` and `engine.gkp`."""
