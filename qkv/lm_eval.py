"""``python -m qkv.lm_eval run --model qkv --model_args checkpoint=RUN_DIR --tasks NAME ...``: lm-eval's own
command line (every flag of ``lm-eval run``) with qkv's model registered under the name ``qkv``.

lm-eval looks models up in its registry only, and a package outside lm-eval enters it by being imported, so
plain ``lm-eval --model qkv`` cannot find it; this module imports the model, then hands over to lm-eval's CLI.
``qkv evaluate --checkpoint RUN --tasks ...`` is the same evaluation with qkv's outputs (docs/evaluation.md)."""
from __future__ import annotations

import sys


def main() -> int:
    from qkv.errors import UserError

    try:
        from qkv.inference.lm_eval_run import require_lm_eval

        require_lm_eval()
        import qkv.inference.lm_eval_model  # noqa: F401  (registers "qkv")
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except UserError as err:
        print(f"qkv: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
