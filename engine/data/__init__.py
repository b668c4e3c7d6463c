"""Datasets for fine-tuning and evaluation (digits, CIFAR-10 folders, image folders) with
deterministic splits, batched training augmentation, and training batches delivered on the
device (in-memory splits sliced there, files through DataLoader workers). May import `engine.common` and
`engine.models`."""
