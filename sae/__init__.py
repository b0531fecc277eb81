"""Sparse autoencoders: architectures, training (a Ray Train job) and SAE metrics."""
