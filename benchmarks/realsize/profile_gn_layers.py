"""Per-GroupNorm-layer node costs on onnxruntime CPU: the export against fused forms, profiled in pairs.

For a real-size model (``NAME`` of ``/work/bigmodels``) this fuses the export with the ``ort``
target of this checkout (or takes fused models given with ``--fused LABEL=FILE``, e.g. one made by
another checkout), opens one profiling onnxruntime session per model (the settings of
``bench_realsize.py``: 2 intra-op threads, spinning off) and runs them alternated, ``--runs`` rounds
after one warm-up, so that a loaded machine slows every form alike; every node's time is its median
over the runs. From the per-node profile:

* the GroupNorm layers' nodes: in a fused model the nodes onnxruntime inlined from our op
  (``_inlfunc_GroupNormalization*``); in the export the nodes the fusion removed (by name); an
  NCHWc ``ReorderInput``/``ReorderOutput`` right next to a layer shows in its per-layer row but
  not in the GN layers' time;
* per op type over the whole model: kernel ms per run and nodes (what the NCHWc layout moved);
* per layer size (the layer's input ``C x H x W``): layers, then per op type kernel µs per layer and
  nodes per layer, in each form; the share of node time the GN layers hold; the difference left.

    .venv/bin/python benchmarks/realsize/profile_gn_layers.py resnet50_gn_ts_static [--runs 10]
        [--fused before=/tmp/before.onnx] [--no-fuse] [--time ROUNDS]

``--time ROUNDS`` times the same forms instead (whole model, alternated rounds, ratios with quartiles).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics
import sys
import tempfile

import onnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_realsize as br  # noqa: E402

__all__ = ["main"]

_INLINED = "_inlfunc_GroupNormalization"
_REORDER = ("ReorderInput", "ReorderOutput")


def _node_names(path: pathlib.Path) -> set[str]:
    """Names of the main graph's standard nodes (our op's node may keep the name of a node it replaced)."""
    model = onnx.load(str(path), load_external_data=False)
    return {n.name for n in model.graph.node if n.domain in ("", "ai.onnx")}


def _profile(sessions: dict, feeds: dict, runs: int) -> dict[str, list[dict]]:
    """Alternated runs of every session; returns {label: node events after the warm-up}."""
    for sess in sessions.values():
        sess.run(None, feeds[id(sess)])
    for _ in range(runs):
        for sess in sessions.values():
            sess.run(None, feeds[id(sess)])
    events = {}
    for label, sess in sessions.items():
        ev = json.loads(pathlib.Path(sess.end_profiling()).read_text())
        starts = sorted(e["ts"] for e in ev if e.get("name") == "model_run")
        start = starts[1] if len(starts) > 1 else 0
        events[label] = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    return events


def _shape(event) -> str:
    shapes = event["args"].get("input_type_shape") or [{}]
    dims = next(iter(shapes[0].values()), [])
    return "x".join(map(str, dims[1:])) if dims else "?"


def _layers(events: list[dict], is_gn, runs: int):
    """Split the node stream of one run into GN layers (consecutive GN nodes); per layer its
    size (first node's input) and {op: [µs, nodes]}, with the Reorders touching it."""
    per_run = len(events) // runs
    if per_run * runs != len(events):
        raise SystemExit(f"{len(events)} node events are not {runs} runs of one node sequence")
    layers = []
    current = None
    for k, e in enumerate(events[:per_run]):
        name = e["name"][: -len("_kernel_time")]
        op = e["args"]["op_name"]
        if is_gn(name):
            if current is None:
                current = {"size": _shape(e), "nodes": collections.Counter(), "index": k}
                layers.append(current)
            current["nodes"][op] += 1
        else:
            current = None
    return layers, per_run


def _median(events: list[dict], per_run: int, k: int, runs: int) -> float:
    """Median over the runs of node ``k``'s kernel µs: a loaded machine's spikes drop out."""
    return statistics.median(events[r * per_run + k]["dur"] for r in range(runs))


def _by_op(events: list[dict], runs: int) -> dict[str, tuple[float, int]]:
    """{op type: (µs per run, nodes per run)} from the node medians."""
    per_run = len(events) // runs
    out = collections.defaultdict(lambda: [0.0, 0])
    for k in range(per_run):
        entry = out[events[k]["args"]["op_name"]]
        entry[0] += _median(events, per_run, k, runs)
        entry[1] += 1
    return {op: tuple(v) for op, v in out.items()}


def _costs(events: list[dict], is_gn, runs: int):
    """{size: (layers, {op: µs per layer}, {op: nodes per layer})}, GN µs per run, total µs per run."""
    layers, per_run = _layers(events, is_gn, runs)
    sizes = collections.OrderedDict()
    total = sum(_median(events, per_run, k, runs) for k in range(per_run))
    gn_total = 0.0
    # every run has the same node order: position k of run r is events[r * per_run + k]
    for layer in layers:
        n_ops = sum(layer["nodes"].values())
        span = range(layer["index"] - 1, layer["index"] + n_ops + 1)
        us = collections.Counter()
        nodes = collections.Counter()
        for k in span:
            if not 0 <= k < per_run:
                continue
            op = events[k]["args"]["op_name"]
            inside = layer["index"] <= k < layer["index"] + n_ops
            if not inside and op not in _REORDER:
                continue
            us[op] += _median(events, per_run, k, runs)
            nodes[op] += 1
            if inside:
                gn_total += _median(events, per_run, k, runs)
        entry = sizes.setdefault(layer["size"], [0, collections.Counter(), collections.Counter()])
        entry[0] += 1
        entry[1].update(us)
        entry[2].update(nodes)
    return sizes, gn_total, total


def report(name: str, events: dict, gn_of: dict, runs: int) -> None:
    labels = list(events)
    costs = {k: _costs(events[k], gn_of[k], runs) for k in labels}
    print(f"\n### {name}: GroupNorm layers, {runs} alternated profiled runs (µs per layer, nodes per layer)\n")
    print("| form | node time per run ms | GN layers' nodes ms (share) | GN nodes per run |")
    print("|---|---|---|---|")
    for k in labels:
        sizes, gn, total = costs[k]
        count = sum(sum(v[2].values()) - sum(v[2][op] for op in _REORDER) for v in sizes.values())
        print(f"| {k} | {total / 1e3:.1f} | {gn / 1e3:.2f} ({100 * gn / total:.1f}%) | {count} |")
    base = labels[0]
    for k in labels[1:]:
        _, gn_b, tot_b = costs[base]
        _, gn_k, tot_k = costs[k]
        print(f"\n{k} - {base}: GN nodes {(gn_k - gn_b) / 1e3:+.2f} ms per run "
              f"({100 * (gn_k - gn_b) / tot_b:+.1f}% of {base}'s node time), all nodes {(tot_k - tot_b) / 1e3:+.2f} ms")
    print("\n| op type (whole model) | " + " | ".join(f"{k}: ms per run (nodes)" for k in labels) + " |")
    print("|---|" + "---|" * len(labels))
    by_op = {k: _by_op(events[k], runs) for k in labels}
    for op in sorted(set().union(*by_op.values()), key=lambda o: -max(by_op[k].get(o, (0, 0))[0] for k in labels)):
        print(f"| {op} | " + " | ".join(
            "—" if op not in by_op[k] else f"{by_op[k][op][0] / 1e3:.2f} ({by_op[k][op][1]})" for k in labels) + " |")
    all_sizes = list(dict.fromkeys(s for k in labels for s in costs[k][0]))
    print("\n| layer input C x H x W | layers | " + " | ".join(f"{k}: µs/layer by op (nodes)" for k in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for size in all_sizes:
        cells = []
        layers = None
        for k in labels:
            entry = costs[k][0].get(size)
            if entry is None:
                cells.append("—")
                continue
            layers = entry[0]
            parts = [f"{op} {us / entry[0]:.0f} ({entry[2][op] / entry[0]:.3g})"
                     for op, us in sorted(entry[1].items(), key=lambda kv: -kv[1])]
            total = sum(entry[1].values()) / entry[0]
            cells.append(f"**{total:.0f}**: " + ", ".join(parts))
        print(f"| {size} | {layers} | " + " | ".join(cells) + " |", flush=True)


def time_forms(name: str, paths: dict, ins, ref, repeats: int) -> None:
    """Whole-model latency of every form, rounds alternated in one process (``bench_realsize.rounds``:
    the export first, the others rotating): median ms, fused/export ratio with quartiles, error."""
    runners = {"original" if k == "export" else k: br.ort_runner(p, ins) for k, p in paths.items()}
    ms, ratio, outs = br.rounds(runners, repeats)
    print(f"\n### {name}: {repeats} alternated rounds after one warm-up\n")
    print("| form | median ms | / export [quartiles] | max abs err vs framework |")
    print("|---|---|---|---|")
    for k in runners:
        cell = "1" if k == "original" else br.fmt_ratio(ratio[k])
        print(f"| {'export' if k == 'original' else k} | {br.fmt_ms(ms[k])} | {cell} | {br.max_err(outs[k], ref):.1e} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a ready model of /work/bigmodels")
    ap.add_argument("--runs", type=int, default=10, help="profiled rounds after one warm-up (default 10)")
    ap.add_argument("--fused", nargs="*", default=[], metavar="LABEL=FILE", help="fused models to profile too")
    ap.add_argument("--no-fuse", action="store_true", help="do not fuse with this checkout")
    ap.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                    help="time the same forms instead (no profiler): ROUNDS alternated rounds, ratios to the export")
    args = ap.parse_args(argv)
    ins, ref, _ = br.load_data(args.name)
    src = br.MODELS / f"{args.name}.onnx"
    paths = {"export": src}
    for item in args.fused:
        label, _, file = item.partition("=")
        paths[label] = pathlib.Path(file)
    with tempfile.TemporaryDirectory(dir=br.MODELS, prefix=".fused-") as work:
        if not args.no_fuse:
            dst = pathlib.Path(work) / f"{args.name}.ort.onnx"
            _, _, rep, err = br.fuse_child(src, dst, "ort")
            if rep is None:
                sys.exit(f"{args.name}: fuse failed: {err}")
            paths["ort (this checkout)"] = dst
        if args.time:
            time_forms(args.name, paths, ins, ref, args.time)
            return 0
        exported = _node_names(src)
        fused_names = set().union(*(_node_names(p) for k, p in paths.items() if k != "export"))
        removed = exported - fused_names
        gn_of = {k: (lambda n: n in removed) if k == "export" else (lambda n: n.startswith(_INLINED)) for k in paths}
        sessions, feeds = {}, {}
        with tempfile.TemporaryDirectory() as prof:
            for k, p in paths.items():
                sess = br.ort_session(p, profile_prefix=str(pathlib.Path(prof) / f"p{len(sessions)}"))
                sessions[k] = sess
                feeds[id(sess)] = {i.name: x for i, x in zip(sess.get_inputs(), ins)}
            events = _profile(sessions, feeds, args.runs)
    report(args.name, events, gn_of, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
