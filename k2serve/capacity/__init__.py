"""KV capacity planning: the memory one rank needs for a model config (weights by kind, KV per token,
activations) on a device and a parallel layout, and how many full-length sessions fit."""
