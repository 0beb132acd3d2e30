"""``kvc-lm-eval`` / ``python -m kvcompress.harness``: lm-eval's own CLI with ``kvcompress`` registered and the
offline ``kvc_*`` tasks on the include path (lm-eval 0.4.x has no plugin discovery for models).

    python -m kvcompress.harness --model kvcompress --model_args model=smollm2-135m,cache=int4 --tasks hellaswag
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from kvcompress.harness import TASKS_DIR  # registers the model

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
