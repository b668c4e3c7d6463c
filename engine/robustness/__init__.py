"""Robustness evaluation (SPEC §7): attacks as text specs run through torchattacks, clean and
robust accuracy on the same examples, the frequency and corruption probes, and evaluation and
probes sharded across torchrun processes. May import `engine.common`, `engine.models` and
`engine.data`."""
