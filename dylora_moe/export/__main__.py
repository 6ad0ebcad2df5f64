"""``python -m dylora_moe.export CHECKPOINT OUT --format peft|merged|vllm``: see :mod:`dylora_moe.export`.

Progress on stdout, one line per folder written; a bad checkpoint, flag or output folder is one line on stderr and
exit status 2, with nothing written."""

from __future__ import annotations

import argparse
import sys

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (python -m dylora_moe.export --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dylora_moe.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a DyLoRA_MoE checkpoint folder (train.py's final/, or save_pretrained's)")
    p.add_argument("out", help="output folder: new, empty, or an earlier export to replace")
    p.add_argument("--format", required=True, choices=("peft", "merged", "vllm"), dest="fmt")
    p.add_argument("--base_model", default=None, help="base model path or hub id (default: the checkpoint's)")
    p.add_argument("--per_domain", action="store_true", help="merged: also one model per training domain")
    p.add_argument("--data_dir", default=None, help="per_domain: measure each domain's routing on these corpora")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from . import ExportError, export_checkpoint

    try:
        export_checkpoint(
            args.checkpoint, args.out, args.fmt, base_model=args.base_model, per_domain=args.per_domain,
            data_dir=args.data_dir, progress=lambda line: print(line, flush=True),
        )  # fmt: skip
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(f"done: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
