"""In-train mask pruning under adversarial training (the ITP seed, SPEC §8): continuous masks
with tanh normalisation and a straight-through round, the hardware loss on MACs or params, the
training rules that run inside the fine-tune loop, and the masks turned into a pruning plan.
May import every engine package up to `training`; `config`, `pipeline` and `report` sit above."""
