"""Fuse every model of models/ and print, per exporter family, how many GroupNormalization
layers fused (against the manifest's count), how many candidates were skipped, and
whether every fused model still matches the framework's recorded outputs.

    python benchmarks/corpus_summary.py
"""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort

from onnx_groupnorm.rewriter import fuse

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"


def _matches(model: onnx.ModelProto, entry: dict) -> bool:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with np.load(MODELS / entry["data"]) as data:
        feeds = {i.name: data[f"in_{k}"] for k, i in enumerate(session.get_inputs())}
        expected = [data[f"out_{k}"] for k in range(len(entry["outputs"]))]
    actual = session.run(None, feeds)
    tol = entry["tolerance"]
    return all(np.allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol["rtol"], atol=tol["atol"]) for a, e in zip(actual, expected))


def main() -> None:
    manifest = json.loads((MODELS / "manifest.json").read_text())
    rows = collections.defaultdict(lambda: collections.Counter())
    for entry in manifest["models"]:
        fused, report = fuse(onnx.load(MODELS / entry["file"]))
        row = rows[entry["pattern_family"]]
        row["models"] += 1
        row["expected"] += entry["expected_group_norms"]
        row["fused"] += len(report.fused)
        row["skipped"] += len(report.skipped)
        row["match framework"] += _matches(fused, entry)
    print("| family | models | layers expected | layers fused | skipped | fused models matching the framework |")
    print("|---|---|---|---|---|---|")
    total = collections.Counter()
    for family, row in sorted(rows.items()):
        total.update(row)
        print(f"| {family} | {row['models']} | {row['expected']} | {row['fused']} | {row['skipped']} | {row['match framework']}/{row['models']} |")
    print(f"| all | {total['models']} | {total['expected']} | {total['fused']} | {total['skipped']} | {total['match framework']}/{total['models']} |")
    print(f"\nexport routes recorded as failing: {len(manifest['failures'])}")


if __name__ == "__main__":
    main()
