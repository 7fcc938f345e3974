"""`flexvlm-train {lut,supervised,ppo,maskable_ppo,dpo,grpo} [--env ...] [--seed N] [--total-env-steps N] ...`

One console script; each method is one readable file in this package (`trainers/<method>.py`)
with an `Args` dataclass (its `--help` lists every argument) and a `main(args)`.
"""
from __future__ import annotations

import importlib
import sys

METHODS = {
    "lut": "trainers.lut",
    "supervised": "trainers.supervised",
    "ppo": "trainers.ppo",
    "maskable_ppo": "trainers.ppo",
    "dpo": "trainers.dpo",
    "grpo": "trainers.grpo",
}


def parse_args(method: str, argv: list[str]):
    """The method's `Args` from `flexvlm-train METHOD ARGV...` (tyro: a malformed flag exits with status 2).

    With `--resume RUN_DIR` the run's args.json gives the defaults, so the flags given with it only repeat
    or override them (`trainers.common.check_resume` then refuses an override that would change training)."""
    import tyro

    from .common import resume_args

    module = importlib.import_module(METHODS[method])
    prog = f"flexvlm-train {method}"
    default = module.Args(maskable=True) if method == "maskable_ppo" else module.Args()
    args = tyro.cli(module.Args, args=argv, prog=prog, default=default)
    if args.resume is not None:
        args = tyro.cli(module.Args, args=argv, prog=prog, default=resume_args(default, args.resume))
    return args


def main(argv: list[str] | None = None) -> None:
    from .common import check_resume

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        usage = (f"{__doc__.strip()}\n\nmethods: {', '.join(METHODS)}; `flexvlm-train METHOD --help` lists a method's "
                 "arguments")
        print(usage, file=sys.stdout if argv else sys.stderr)  # no method: a usage error
        raise SystemExit(0 if argv else 2)
    method, rest = argv[0], argv[1:]
    if method not in METHODS:
        print(f"flexvlm-train: method={method!r} is not known; allowed: {list(METHODS)}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(METHODS[method])
    prog = f"flexvlm-train {method}"
    try:
        args = parse_args(method, rest)
        args.validate()  # main() validates again; here a bad value is a usage error, not a traceback
        if args.resume is not None:
            check_resume(method, args)
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    module.main(args)


if __name__ == "__main__":
    main()
