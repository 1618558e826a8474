"""Fixtures, not the model: random checkpoints at real names and shapes, tiny tokenizers."""
