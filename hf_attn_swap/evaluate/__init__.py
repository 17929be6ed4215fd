"""Measuring models: ``metrics`` (perplexity, KL, top-1 agreement, measured KV bytes), ``speed`` (decode
tokens/s), ``tasks`` (lm-eval), ``longcontext`` (RULER-style retrieval, perplexity by position), ``suite``
(several checkpoints, one report, its markdown), ``plots``, ``embeddings`` (sentence-embedding agreement).
Imports modeling and io only."""
