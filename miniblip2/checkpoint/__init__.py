"""Files in, arrays and settings out: safetensors.py (weights, coverage, nesting), config.py
(config.json), image.py (preprocessing), tokenizer.py and processor.py."""
