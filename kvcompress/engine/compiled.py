"""The captured decode step compiled for the CPU by Inductor: what a CUDA graph is to the GPU.

A decode step over a static-capacity cache (``kvcompress.engine.static``) has fixed shapes and no host
synchronisation, so ``torch.compile(fullgraph=True)`` traces it as one graph. On the CPU the eager step is
bound by its ~211 matrix-vector products per token (7 per layer + the LM head), which PyTorch's eager GEMV runs
at a fraction of the memory bandwidth. Inductor with ``freezing`` (weights become constants, prepacked for the
GEMM) and ``max_autotune`` (picks, per shape, between its own C++ GEMM template and the packed MKL/oneDNN
kernel) removes that overhead and fuses the elementwise ops (RMSNorm, rotary, SwiGLU) around them. Freezing must
be on while Dynamo traces, not only while Inductor compiles (``torch.compile(options=...)`` sets it for the
latter only): Dynamo decides then whether a parameter becomes a graph constant or a graph input, and an input
weight can be neither prepacked nor given to the C++ template (every product stays the eager ``aten.mm``). So
each call runs under ``torch._inductor.config.patch(COMPILE_OPTIONS)`` (a recompile traces at call time too).

Compiling costs tens of seconds per (model, cache, batch, capacity) shape; it is paid once per shape and machine:
Inductor's FX graph cache and autotuning results live under ``~/.cache/kvcompress/inductor``
(``TORCHINDUCTOR_CACHE_DIR`` overrides), so a later run reloads them. A step that cannot be compiled (a graph
break such as dynamic-NTK rope's host read of max(pos), or any compiler error) runs eagerly and says why once
on stderr: ``reason``.
"""
from __future__ import annotations

import os
import sys
import time
import types

import torch
import torch._inductor.config
from torch import Tensor
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from kvcompress.cache.base import KVCache
from kvcompress.engine.static import decode_step

# freezing: weights are constants (prepacked); the CPP template is Inductor's own GEMM, ATEN the packed MKL one;
# emulate_precision_casts: a cast to fp16 / bf16 rounds inside a fused kernel as it does eagerly (without it Inductor
# folds x.half().float() into x, and the quantizers' outward-rounded fp16 scales and zero points come out otherwise)
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                   "emulate_precision_casts": True}
CACHE_DIR = "~/.cache/kvcompress/inductor"


def use_disk_cache() -> str:
    """Inductor's caches (kernels, autotuning) under ``CACHE_DIR`` unless ``TORCHINDUCTOR_CACHE_DIR`` names another
    folder. Importing ``torch._inductor`` writes torch's own default (a temporary folder) into that variable, so
    that value counts as unset."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.expanduser(CACHE_DIR)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _fresh_step():
    """``decode_step`` under a code object of its own: Dynamo keeps compiled graphs (and its recompile limit) per
    code object, so each compiled step owns its graph instead of piling guards onto one shared function."""
    return types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__, "compiled_decode_step")


class CompiledDecode:
    """``decode_step`` of one token per row over a static cache, compiled by Inductor at construction.

    ``__call__(tokens (B, 1), pos (B, 1))`` returns logits (B, 1, V) (a fresh tensor each call). Construction
    compiles and runs one step (``compile_s`` seconds, cache state restored afterwards). Where compiling fails,
    ``compiled`` is False, ``reason`` says why (also printed on stderr) and the step runs eagerly.
    """

    def __init__(self, model, cache: KVCache, batch_size: int, options: dict | None = None):
        self.model, self.cache = model, cache
        self.compiled, self.reason, self.compile_s = False, None, 0.0
        if getattr(model.rope, "kind", "default") == "dynamic":
            self._eager("dynamic-NTK rope reads max(pos) on the host each step (a graph break)")
            return
        use_disk_cache()
        self.options = dict(COMPILE_OPTIONS if options is None else options)
        self._step = torch.compile(_fresh_step(), fullgraph=True, dynamic=False, options=self.options)
        tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=model.device)
        t0 = time.perf_counter()
        try:
            self._first_step(tokens)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly, and say why
            self._eager(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            return
        self.compiled, self.compile_s = True, time.perf_counter() - t0

    def _eager(self, reason: str) -> None:
        self.reason = reason
        print(f"kvc: warning: the compiled decode step runs eagerly: {reason}", file=sys.stderr)

    @torch.inference_mode()
    def _first_step(self, tokens: Tensor) -> None:
        """Compile by running one step at position 0, then restore the cache (the step's write is undone)."""
        saved = [t.clone() for t in self.cache.tensors()]
        self._run(tokens, torch.zeros_like(tokens))
        if not saved:  # the step allocated the buffers: clear them in place (addresses kept)
            self.cache.reset(tokens.shape[0])
        for t, s in zip(self.cache.tensors() if saved else (), saved, strict=True):
            t.copy_(s)

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, pos: Tensor) -> Tensor:
        if not self.compiled:
            return decode_step(self.model, tokens, pos, self.cache)
        return self._run(tokens, pos)

    def _run(self, tokens: Tensor, pos: Tensor) -> Tensor:
        with torch._inductor.config.patch(self.options):  # freezing seen by Dynamo's trace: weights constants
            return self._step(self.model, tokens, pos, self.cache)
