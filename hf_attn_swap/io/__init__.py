"""Folders and files: atomic output folders and guards (``folders``), checkpoint loading and tokenizer files
(``checkpoints``), local text for evaluation / calibration / training (``text``), the packaged real models
(``examples``). Imports nothing else of hf_attn_swap."""
