"""The ``onnx-groupnorm`` command line: argument parsing, messages and exit codes only.

Exit codes: 0 success (also when nothing was fused), 1 verification failed, 2 bad input
or usage (one line naming the file), 3 an internal error (a bug: please report it with the
model), 130 interrupted (SIGINT), 143 terminated (SIGTERM). No traceback is printed unless
``-v``; temporary files are removed on every one of these exits. All the work is in
:mod:`onnx_groupnorm.rewriter`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import logging.handlers
import pathlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from . import __version__
from .rewriter import TARGETS
from .rewriter.targets import DEFAULT_TARGET

__all__ = [
    "main",
    "main_parser",
    "entrypoint",
    "EXIT_OK",
    "EXIT_VERIFY_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM

#: Measured by benchmarks/precision.py: onnxruntime's GroupNormalization-21 kernel returns
#: NaN on float32 inputs with mean 1e3 (it computes E[x^2] - E[x]^2 in float32).
_ONNX_TARGET_WARNING = (
    "--target onnx: GroupNormalization-21 loses precision on inputs with a large mean "
    "(onnxruntime returns NaN at mean 1e3 in float32; benchmarks/precision.py); "
    "--target function or ort keep our op's two-pass algorithm"
)

logger = logging.getLogger("onnx_groupnorm")


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-groupnorm",
        description="Fuse exported GroupNormalization subgraphs (Keras, PyTorch) into one ONNX op.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    output = argparse.ArgumentParser(add_help=False)
    loudness = output.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug logs, and a traceback for any error")
    loudness.add_argument("-q", "--quiet", action="store_true", help="print errors only")

    fuse = sub.add_parser("fuse", parents=[output], help="fuse, optionally verify, and save a model")
    fuse.add_argument("input", type=pathlib.Path, help="the exported model (.onnx)")
    fuse.add_argument("-o", "--output", type=pathlib.Path, required=True, help="where to write the fused model")
    fuse.add_argument("--verify", action="store_true", help="run the input and the fused model in onnxruntime (CPU) on inputs the model accepts and judge every fused layer against a float64 reference (needs the ort extra)")
    fuse.add_argument("--report", type=pathlib.Path, help="write the report as JSON to this file")
    fuse.add_argument("--keep-standard", action="store_true", help="leave standard ONNX GroupNormalization ops as they are")
    fuse.add_argument(
        "--target", choices=list(TARGETS), default=DEFAULT_TARGET,
        help=f"deployment form (default: {DEFAULT_TARGET}); the README says which target fits which runtime",
    )
    fuse.add_argument("--absorb-silu", dest="absorb_activation", action="store_true", default=None, help="fold a following SiLU/swish into the op (activation=1)")
    fuse.add_argument(
        "--precise", action="store_true",
        help="keep our precision shift in every layer; without it the ort target computes layers torch exported as "
        "InstanceNormalization with that export's own arithmetic (never slower, as precise as the export)",
    )
    fuse.add_argument("--seed", type=int, default=0, help="seed of the verification inputs (default 0)")
    fuse.add_argument("--input-shape", action="append", default=[], metavar="NAME=DxD", help="verification input shape of input NAME, e.g. audio=1x16000 (repeatable; default: found by trying)")
    fuse.add_argument("--inputs", type=pathlib.Path, metavar="FILE.npz", help="verification inputs: arrays by input name (np.savez)")

    inspect = sub.add_parser("inspect", parents=[output], help="list GroupNormalization candidates and whether each would fuse")
    inspect.add_argument("input", type=pathlib.Path, help="the exported model (.onnx)")
    inspect.add_argument("--keep-standard", action="store_true", help="treat standard GroupNormalization ops as not candidates")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _node_count(model) -> int:
    """Nodes of the graph and its subgraphs (function bodies we attach are not counted)."""
    return sum(len(graph) for graph in model.graphs())


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text)


def _fuse(args) -> int:
    from .rewriter import io

    io.check_paths(args.input, args.output, args.report)
    if args.verify:
        _check_verifiable(args.target)
    with contextlib.ExitStack() as stack:
        return _fuse_and_save(args, stack)


def _fuse_and_save(args, stack: contextlib.ExitStack) -> int:
    from .rewriter import fuse, io
    from .rewriter.inputs import InputSpec

    verify_inputs = InputSpec.from_cli(args.input_shape, args.inputs)
    model = io.load_model(args.input)
    io.check_spares_input(args.input, args.output, args.report)
    original, work = args.input, None
    if args.verify:
        # onnxruntime runs the original from its file, external data in place, and the fused
        # model from its graph alone with the same data. Weights held in memory go once to a
        # temporary folder beside the output (freed from memory, memory-mapped from there
        # by us and by onnxruntime) until the output is written.
        work = stack.enter_context(io.temp_dir(args.output.parent))
        if io.in_memory_bytes(model) > io.INLINE_WEIGHTS_BYTES:
            io.offload_weights(model, work)
            original = None  # a copy of the graph alone, taken before the fusion
    if args.target == "onnx":
        logger.warning(_ONNX_TARGET_WARNING)
    nodes_before = _node_count(model)
    fused, report = fuse(
        model,
        verify=args.verify,
        verify_original=original if args.verify else None,
        verify_workdir=work,
        keep_standard=args.keep_standard,
        target=args.target,
        absorb_activation=args.absorb_activation,
        precise=args.precise,
        source=str(args.input),
        seed=args.seed,
        verify_inputs=verify_inputs,
    )
    _say(args, report.summary(nodes=(nodes_before, _node_count(fused))))
    if args.report is not None:
        io.save_text(report.to_json() + "\n", args.report)
    if report.verification is not None and not report.verification.passed:
        print(f"error: {args.input}: the fused model differs from the original beyond the tolerance; {args.output} not written", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    io.save_model(fused, args.output, input_path=args.input)
    _say(args, f"wrote {args.output}")
    return EXIT_OK


def _check_verifiable(target: str) -> None:
    """--verify of a target whose op has no kernel in this onnxruntime is refused up front.
    (Where a GPU provider is installed, the pipeline verifies the same fusion in its
    portable form on CPU and says so in the verification line.)"""
    from .rewriter.errors import UsageError
    from .rewriter.targets import NOT_ON_CPU

    if target not in NOT_ON_CPU:
        return
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    if not set(providers) - {"CPUExecutionProvider", "AzureExecutionProvider"}:
        raise UsageError(
            f"--verify with --target {target} is unsupported on this machine: {NOT_ON_CPU[target]}, and this "
            f"onnxruntime has only {', '.join(providers) or 'no provider'}; verify the same fusion with "
            "--target function --verify, or run on a machine with a GPU onnxruntime"
        )


def _already_fused(model) -> list[str]:
    """Nodes of our op, or of its ort-gpu form (com.microsoft.GroupNorm)."""
    from .ops import contract
    from .rewriter.targets import ort_gpu

    ours = {(contract.DOMAIN, contract.OP_TYPE), (ort_gpu.MS_DOMAIN, ort_gpu.MS_OP)}
    return [node.name or node.op_type for graph in model.graphs() for node in graph if (node.domain, node.op_type) in ours]


def _inspect(args) -> int:
    from .rewriter import fuse, io

    io.check_paths(args.input)
    model = io.load_model(args.input)
    ours = _already_fused(model)
    _, report = fuse(model, keep_standard=args.keep_standard, source=str(args.input))
    if args.json:
        data = report.to_dict()
        print(json.dumps({"source": data["source"], "already_fused": ours, "would_fuse": data["fused"], "skipped": data["skipped"], "notes": data["notes"]}, indent=2))
        return EXIT_OK
    if ours:
        _say(args, f"{args.input}: already fused: {len(ours)} GroupNormalization node(s) of ours ({', '.join(ours[:5])}{', ...' if len(ours) > 5 else ''})")
    _say(args, f"{args.input}: {len(report.fused)} GroupNormalization candidate(s) would fuse, {len(report.skipped)} would not")
    for f in report.fused:
        _say(args, f"  would fuse {f.node} ({f.rule}): groups={f.groups} axis={f.axis} epsilon={f.epsilon:g} channels={f.channels} center={f.center} scale={f.scale}")
    for s in report.skipped:
        _say(args, f"  would not fuse {s.node} ({s.rule}): {s.reason}")
    for n in report.notes:
        _say(args, f"  note: {n}")
    return EXIT_OK


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks remove temporary files."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _OursOrErrors(logging.Filter):
    """At default verbosity, other libraries' warnings (onnx-ir's notes on invalid models,
    repeated per node) are left to -v; ours and every error are shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.startswith("onnx_groupnorm")


class _NoTraceback(logging.Filter):
    """Libraries log exceptions with exc_info (onnx-ir's ShapeInferencePass does, with a
    "%s" it never fills): keep the message and the exception's first line, drop the
    traceback unless -v."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .rewriter.errors import one_line

        if record.exc_info and record.exc_info[1] is not None:
            reason = one_line(record.exc_info[1])
            if not record.args and "%s" in str(record.msg):
                record.args = (reason,)
            else:
                record.msg = f"{record.getMessage()} ({reason})"
                record.args = ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


@contextlib.contextmanager
def _logging(args) -> Iterator[Callable[[int], None]]:
    """Our own handler on the root logger, on the stderr of this call, removed afterwards
    (main() runs more than once in a process under tests). Without -v, warnings are held
    until the end and shown only if the run did not fail: a refusal is one line. Yields
    ``release(exit_code)``."""
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
    if args.verbose:
        handler = stream
    else:
        handler = logging.handlers.MemoryHandler(10_000, flushLevel=logging.CRITICAL + 1, target=stream, flushOnClose=False)
        handler.addFilter(_OursOrErrors())
        handler.addFilter(_NoTraceback())

    def release(code: int) -> None:
        if handler is not stream and code in (EXIT_OK, EXIT_VERIFY_FAILED):
            handler.flush()

    root = logging.getLogger()
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield release
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _classify(error: Exception, path: pathlib.Path):
    """A ModelFileError when ``error`` is the input model's fault, else None (our bug)."""
    from .rewriter.errors import model_file_error

    if (type(error).__module__ or "").startswith("onnxruntime"):
        # onnxruntime refused a model: the input's fault only if it refuses the input itself.
        refusal = _onnxruntime_refusal(path)
        return None if refusal is None else model_file_error(refusal, path)
    return model_file_error(error, path)


def _onnxruntime_refusal(path: pathlib.Path) -> Exception | None:
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        return e
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = main_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    with _logging(args) as release, _sigterm_unwinds():
        code = _run(args)
        release(code)
        return code


def _run(args) -> int:
    """The command, with every way it can end turned into an exit code and one line."""
    from .rewriter.errors import ModelFileError, UsageError, one_line

    try:
        return _fuse(args) if args.command == "fuse" else _inspect(args)
    except (ModelFileError, UsageError) as e:
        logger.debug("bad input", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"interrupted: {args.input} is unchanged and no partial output is left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print(f"terminated: {args.input} is unchanged and no partial output is left", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as e:
        logger.debug("error", exc_info=True)
        error = _classify(e, args.input)
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(
            f"error: {args.input}: internal error ({type(e).__name__}: {one_line(e)}); the input is unchanged. "
            "This is a bug: please report it with the model (-v shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


def entrypoint() -> None:
    sys.exit(main())
