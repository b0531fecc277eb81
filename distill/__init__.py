"""Supervised distillation of decoders, lens baselines, and decoder evaluation."""
