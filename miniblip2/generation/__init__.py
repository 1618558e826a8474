"""Decoding, written once for every language model: loops.py (greedy, beam search, sampling over
the decoder interface), processors.py (logits processors and warpers), settings.py (the
generation arguments), streaming.py (text as it comes), chat.py (prompt templates)."""
