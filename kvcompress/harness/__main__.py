"""``kvc-lm-eval`` / ``python -m kvcompress.harness``: lm-eval's own CLI with ``kvcompress`` registered and the
offline ``kvc_*`` tasks on the include path (lm-eval 0.4.x has no plugin discovery for models).

    python -m kvcompress.harness --model kvcompress --model_args model=smollm2-135m,storage=int4 --tasks kvc_wikitext2
"""
from __future__ import annotations

import sys


def given(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def default_device(args: list[str]) -> list[str]:
    """lm-eval's own default device is ``cuda:0``; without CUDA and without ``--device`` ask for the CPU, so no
    one is told that a device they never asked for is missing."""
    import torch

    if not given(args, "--device") and not torch.cuda.is_available():
        return [*args, "--device", "cpu"]
    return args


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from kvcompress.harness import TASKS_DIR  # registers the model

    args = default_device(list(sys.argv[1:] if argv is None else argv))
    if not given(args, "--include_path"):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
