"""Datasets for fine-tuning and evaluation (digits, CIFAR-10 folders, image folders) with
deterministic splits, and batched training augmentation. May import `engine.common` and
`engine.models`."""
