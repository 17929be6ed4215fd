"""Conversion methods, on loaded models: ``gqa/`` (pool K/V heads; one module per method), ``mla/`` (latent
attention; one module per step), ``calibration`` (activations for data-aware methods), ``affine`` (biases
carried as an extra column) and ``report`` (``ConversionReport``). Imports adapters, modeling and io only."""
