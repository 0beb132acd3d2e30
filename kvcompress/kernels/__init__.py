"""Fused kernels for compressed KV storages (Triton on CUDA, PyTorch reference elsewhere).

``quant_attention``: decode attention reading packed int2/int4/int8 codes + fp16 scales/zeros + the
full-precision residual, or FP8 / FP4 codes with their scales (``triton_fp``; Triton only: their reference is the
codec's decode). ``latent_attention``: absorbed attention over latents. ``quantize_tokens``:
quantize-on-append. Choose the implementation with ``backend=`` or ``KVC_KERNELS=triton|torch|auto``.
"""
from kvcompress.kernels.dispatch import resolve, triton_available
from kvcompress.kernels.layout import Packed, dense
from kvcompress.kernels.ops import latent_attention, quant_attention, quantize_tokens

__all__ = ["Packed", "dense", "latent_attention", "quant_attention", "quantize_tokens", "resolve",
           "triton_available"]
