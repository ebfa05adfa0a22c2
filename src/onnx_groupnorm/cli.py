"""The ``onnx-groupnorm`` command line: argument parsing and exit codes only.

Exit codes: 0 success (also when nothing was fused), 1 verification failed, 2 bad input
or usage, 3 an internal error (a bug: please report it with the model). All the work is in
:mod:`onnx_groupnorm.rewriter`.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

from . import __version__

__all__ = ["main", "main_parser", "entrypoint", "EXIT_OK", "EXIT_VERIFY_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERNAL_ERROR"]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-groupnorm",
        description="Fuse exported GroupNormalization subgraphs (Keras, PyTorch) into one ONNX op.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fuse = sub.add_parser("fuse", help="fuse, optionally verify, and save a model")
    fuse.add_argument("input", type=pathlib.Path, help="the exported model (.onnx)")
    fuse.add_argument("-o", "--output", type=pathlib.Path, required=True, help="where to write the fused model")
    fuse.add_argument("--verify", action="store_true", help="compare the fused model with the input in onnxruntime (CPU) on seeded random inputs")
    fuse.add_argument("--report", type=pathlib.Path, help="write the report as JSON to this file")
    fuse.add_argument("--keep-standard", action="store_true", help="leave standard ONNX GroupNormalization ops as they are")
    fuse.add_argument("--target", default="function", help="deployment form: function (default: our op with its function body), onnx, ort, ort-gpu (where available)")
    fuse.add_argument("--absorb-silu", dest="absorb_activation", action="store_true", default=None, help="fold a following SiLU/swish into the op (activation=1)")
    fuse.add_argument("--seed", type=int, default=0, help="seed of the verification inputs (default 0)")
    fuse.add_argument("--input-shape", action="append", default=[], metavar="NAME=DxD", help="verification input shape of input NAME, e.g. audio=1x16000 (repeatable; default: found by trying)")
    fuse.add_argument("--inputs", type=pathlib.Path, metavar="FILE.npz", help="verification inputs: arrays by input name (np.savez)")

    inspect = sub.add_parser("inspect", help="list GroupNormalization candidates and whether each would fuse")
    inspect.add_argument("input", type=pathlib.Path, help="the exported model (.onnx)")
    inspect.add_argument("--keep-standard", action="store_true", help="treat standard GroupNormalization ops as not candidates")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _fuse(args) -> int:
    from .rewriter import fuse, io
    from .rewriter.inputs import InputSpec

    io.check_output_path(args.output, args.input)
    verify_inputs = InputSpec.from_cli(args.input_shape, args.inputs)
    if args.report is not None:
        io.check_output_path(args.report, args.input)
    model = io.load_model(args.input)
    fused, report = fuse(
        model,
        verify=args.verify,
        keep_standard=args.keep_standard,
        target=args.target,
        absorb_activation=args.absorb_activation,
        source=str(args.input),
        seed=args.seed,
        verify_inputs=verify_inputs,
    )
    print(report.summary())
    if args.report is not None:
        io.save_text(report.to_json() + "\n", args.report)
    if report.verification is not None and not report.verification.passed:
        print(f"error: {args.input}: the fused model differs from the original beyond the tolerance; {args.output} not written", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    io.save_model(fused, args.output)
    print(f"wrote {args.output}")
    return EXIT_OK


def _inspect(args) -> int:
    from .rewriter import fuse, io

    model = io.load_model(args.input)
    _, report = fuse(model, keep_standard=args.keep_standard, source=str(args.input))
    if args.json:
        data = report.to_dict()
        print(json.dumps({"source": data["source"], "would_fuse": data["fused"], "skipped": data["skipped"], "notes": data["notes"]}, indent=2))
        return EXIT_OK
    print(f"{args.input}: {len(report.fused)} GroupNormalization candidate(s) would fuse, {len(report.skipped)} would not")
    for f in report.fused:
        print(f"  would fuse {f.node} ({f.rule}): groups={f.groups} axis={f.axis} epsilon={f.epsilon:g} channels={f.channels} center={f.center} scale={f.scale}")
    for s in report.skipped:
        print(f"  would not fuse {s.node} ({s.rule}): {s.reason}")
    for n in report.notes:
        print(f"  note: {n}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = main_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(name)s: %(message)s")
    from .rewriter import TARGETS
    from .rewriter.errors import ModelFileError, UsageError

    if getattr(args, "target", "function") not in TARGETS:
        print(f"error: unknown --target {args.target!r}; choose one of {', '.join(TARGETS)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _fuse(args) if args.command == "fuse" else _inspect(args)
    except (ModelFileError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a bug of ours: say which file, keep the traceback in the log
        logging.getLogger("onnx_groupnorm").debug("internal error", exc_info=True)
        print(f"error: {args.input}: internal error ({type(e).__name__}: {e}); the input is unchanged", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def entrypoint() -> None:
    sys.exit(main())
