"""Latent low-rank KV cache (MLA-style): calibrated projections, reconstructed or absorbed attention."""
