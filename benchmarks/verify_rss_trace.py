"""Where ``fuse --verify`` peaks: the CLI run in this process while a thread samples VmRSS
(with its anonymous and file-backed parts) every ``--interval`` seconds, each sample tagged
with the phase the run is in (load, fuse, each onnxruntime session's creation and run with
its role, part and batch, the float64 checks, save). Prints one row per phase, in order:
RSS when it began, its peak, RSS when it ended, seconds; then the overall peak and its phase.

The phases come from wrapping the library's functions here (nothing in the library knows);
a debugging aid for the numbers ``benchmarks/fuse_memory.py --modes cli-verify`` reports.

    python benchmarks/verify_rss_trace.py MODEL.onnx [--interval 0.02] [--csv trace.csv] [-- EXTRA CLI FLAGS]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pathlib
import sys
import tempfile
import threading
import time

_MIB = 1024


def _status() -> tuple[int, int, int]:
    """VmRSS, RssAnon, RssFile of this process, KiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(rest.split()[0])
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("RssFile", 0)


class Tracer:
    """The current phase (a stack of labels) and, per phase entered, its RSS samples."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stack: list[str] = ["start"]
        self.rows: list[dict] = []
        self.samples: list[tuple[float, str, int, int, int]] = []
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()
        self._enter("start")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _enter(self, label: str) -> None:
        rss = _status()
        self.rows.append({"phase": label, "start": rss[0], "peak": rss, "end": rss[0], "t0": time.perf_counter(), "t1": None,
                          "sys0": os.times().system, "sys1": None})

    def _sample(self) -> None:
        while not self.done.wait(self.interval):
            self.record()

    def record(self) -> None:
        rss = _status()
        with self.lock:
            row = self.rows[-1]
            if rss[0] > row["peak"][0]:
                row["peak"] = rss
            self.samples.append((time.perf_counter() - self.t0, row["phase"], *rss))

    @contextlib.contextmanager
    def phase(self, label: str):
        with self.lock:
            self._close()
            self.stack.append(label)
            self._enter(" > ".join(self.stack[1:]))
        try:
            yield
        finally:
            with self.lock:
                self._close()
                self.stack.pop()
                self._enter(" > ".join(self.stack[1:]) or "start")

    def _close(self) -> None:
        row = self.rows[-1]
        rss = _status()
        row["end"], row["t1"], row["sys1"] = rss[0], time.perf_counter(), os.times().system
        if rss[0] > row["peak"][0]:
            row["peak"] = rss

    def report(self) -> None:
        self.done.set()
        self.thread.join()
        with self.lock:
            self._close()
        rows = [r for r in self.rows if r["t1"] - r["t0"] > 0.0005 or r["peak"][0] > r["start"]]
        print("| phase | RSS at start MiB | peak MiB (anon + file) | at end MiB | s | system CPU s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            peak, anon, file = (v / _MIB for v in r["peak"])
            print(f"| {r['phase']} | {r['start'] / _MIB:.0f} | {peak:.0f} ({anon:.0f} + {file:.0f}) | {r['end'] / _MIB:.0f} | {r['t1'] - r['t0']:.2f} | {r['sys1'] - r['sys0']:.2f} |")
        top = max(self.rows, key=lambda r: r["peak"][0])
        by_kind: dict[str, float] = {}
        for r in rows:  # system CPU time by kind of phase (the label's last part, sizes dropped)
            kind = r["phase"].split(" > ")[-1].split(" [")[0].split(" (")[0]
            kind = "float64 subgraph" if kind.startswith("float64 subgraph") else kind
            by_kind[kind] = by_kind.get(kind, 0.0) + r["sys1"] - r["sys0"]
        print("system CPU s by phase: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]) if v >= 0.05))
        print(f"peak {top['peak'][0] / _MIB:.0f} MiB (anon {top['peak'][1] / _MIB:.0f}, file {top['peak'][2] / _MIB:.0f}) in: {top['phase']}")


def _wrap(owner, name: str, label, tracer: Tracer) -> None:
    """Run ``owner.name`` inside a phase; ``label(*args)`` names it (a string: that name)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with tracer.phase(label(*args, **kwargs) if callable(label) else label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def _shapes(feeds: dict) -> str:
    return ",".join("x".join(map(str, v.shape)) for v in feeds.values())


def instrument(tracer: Tracer) -> None:
    import onnxruntime
    from onnx_groupnorm import cli
    from onnx_groupnorm.rewriter import fusion_pass, io, verify

    _wrap(io, "load_model", "load", tracer)
    _wrap(io, "offload_weights", "offload weights", tracer)
    _wrap(io, "save_model", "save", tracer)
    _wrap(fusion_pass.GroupNormFusionPass, "__call__", "fuse", tracer)
    _wrap(verify, "_verify", "verify", tracer)
    _wrap(verify._Model, "__init__", lambda self, model, role, *a, **k: f"prepare {role}", tracer)
    _wrap(verify._Model, "open", lambda self, model, *a, **k: f"session create {self.role} ({len(model) / 2**20:.1f} MiB graph)", tracer)
    _wrap(verify._Segments, "_session", lambda self, k, *a, **kw: f"part {k + 1}/{len(self.parts)}", tracer)
    _wrap(verify._Tally, "measure", lambda self, side, *a, **k: f"float64 layer check {side}", tracer)
    _wrap(verify, "_confirmed", lambda model, layer, *a, **k: f"float64 subgraph {layer.node}", tracer)
    _wrap(verify, "_noise_floor", "noise floor run", tracer)
    _wrap(onnxruntime.InferenceSession, "run", lambda self, names, feeds, *a, **k: f"run [{_shapes(feeds)}] fetch {len(names)}", tracer)
    del cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=pathlib.Path)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--csv", type=pathlib.Path, help="write every sample (s, phase, rss, anon, file KiB) here")
    parser.add_argument("extra", nargs="*", help="more CLI flags, after --")
    args = parser.parse_args()
    tracer = Tracer(args.interval)
    instrument(tracer)
    from onnx_groupnorm import cli

    with tempfile.TemporaryDirectory() as out:
        code = cli.main(["fuse", str(args.model), "-o", str(pathlib.Path(out) / "out.onnx"), "--verify", *args.extra])
    tracer.report()
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("s,phase,rss_kib,anon_kib,file_kib\n")
            f.writelines(f"{t:.3f},\"{p}\",{r},{a},{fl}\n" for t, p, r, a, fl in tracer.samples)
    print("exit", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
