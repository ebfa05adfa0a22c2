"""What ``--verify`` costs: time and peak RSS of fuse alone, fuse + the verification before
issue #9 (``git show BEFORE:rewriter/verify.py``: one thread, the model's full static size),
and fuse + the current verification, on large models (default: the VAE decoders in
/work/bigmodels made by the bench scripts).

Each measurement runs in a fresh process (peak RSS is per process); the table prints the
verification's wall and CPU seconds (CPU time of all threads: comparable on a busy machine),
peak MiB of the whole process, and the ratio of the verification's wall time to the old one.

    python benchmarks/bench_verify.py [MODEL.onnx ...]
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

#: The last commit with the old verification (one thread, full static size, no layer checks).
BEFORE = "5132041"
MODES = ("fuse", "verify-before", "verify-after")
DEFAULT_MODELS = sorted(glob.glob("/work/bigmodels/*.onnx"))


def _old_verify():
    """The verification module as it was at BEFORE, loaded inside our package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "-C", root, "show", f"{BEFORE}:rewriter/verify.py"], check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("onnx_groupnorm.rewriter._verify_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "onnx_groupnorm.rewriter"
    exec(compile(source, "verify_before.py", "exec"), module.__dict__)
    return module


def child(mode: str, path: str) -> None:
    import onnx

    from onnx_groupnorm.rewriter import fuse, verify

    start = time.perf_counter()
    model = onnx.load(path)
    fused, report = fuse(model)
    fuse_s = time.perf_counter() - start
    verify_s, verify_cpu, result = 0.0, 0.0, None
    if mode != "fuse":
        module = _old_verify() if mode == "verify-before" else verify
        start, cpu = time.perf_counter(), time.process_time()
        v = module.verify(model, fused, seed=0)
        verify_s, verify_cpu = time.perf_counter() - start, time.process_time() - cpu
        result = {"passed": v.passed, "verdict": getattr(v, "verdict", ""), "inputs": v.inputs, "sets": len(getattr(v, "input_sets", [])) or 1}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"fuse_s": fuse_s, "verify_s": verify_s, "verify_cpu_s": verify_cpu, "peak_mib": peak, "layers": len(report.fused), "result": result}))


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit("no model: pass .onnx paths (default: /work/bigmodels/*.onnx, none found)")
    print(f"{'model':40} {'MB':>5} {'mode':14} {'fuse s':>7} {'verify s':>9} {'cpu s':>6} {'peak MiB':>9} {'vs before':>10}  result")
    for path in paths:
        size = os.path.getsize(path) / 1e6
        before = None
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, path], capture_output=True, text=True)
            if out.returncode:
                print(f"{os.path.basename(path):40} {size:5.0f} {mode:14} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if mode == "verify-before":
                before = r
            ratio = f"{r['verify_s'] / before['verify_s']:.2f}x" if before and mode == "verify-after" else ""
            print(f"{os.path.basename(path):40} {size:5.0f} {mode:14} {r['fuse_s']:7.2f} {r['verify_s']:9.2f} {r['verify_cpu_s']:6.2f} {r['peak_mib']:9.0f} {ratio:>10}  {r['result'] or ''}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1:] or DEFAULT_MODELS)
