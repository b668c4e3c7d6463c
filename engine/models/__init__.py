"""Networks and how to measure them: the CIFAR ResNet and VGG definitions, architecture
inference from state-dict keys and shapes, input normalisation, parameter/MAC counts and
latency. May import `engine.common` only."""
