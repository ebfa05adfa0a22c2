"""Inputs for ``--verify`` that the model accepts.

What a model accepts is read from the model first and found by trying second:

* every static size declared on a graph input is used as is; a user's ``--input-shape
  NAME=DxD`` pins an input's whole shape, and ``--inputs FILE.npz`` gives the arrays themselves;
* every dynamic dimension is a *symbol*: the same ``dim_param`` is one symbol in every input
  (so a shared length stays equal), an unnamed dynamic dimension is a symbol of its own.
  Symbols on axis 0 are batch sizes (tried at 2, then 1); the others are grown together by
  doubling from :data:`START` until the original model runs (a strided Conv stack needs a
  few hundred samples, a UNet a multiple of 8), bounded by :data:`MAX_ELEMENTS` per input;
  a second, larger size is tried next (:data:`SECOND_FACTORS`) so every symbol is checked at
  two sizes;
* values fit their type and use: float inputs are seeded normal data; an integer input that
  indexes a Gather on a constant table gets ids below the table's size; a boolean input or an
  integer one named like a mask is all ones in the first set and a realistic mix (a prefix of
  ones per row, never an empty row) in the second; other integers are small (0/1), ``uint8``
  spans 0..255.

An input that cannot be made (an unknown dtype, an integer of unknown meaning with no data, no
size that runs) raises :class:`~.errors.UsageError` naming the input and the flag that
provides it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from .errors import UsageError

__all__ = ["InputSpec", "InputDecl", "Plan", "parse_input_shape", "constant_array", "START", "SECOND_FACTORS", "MAX_ELEMENTS", "FLAG_SHAPE", "FLAG_INPUTS"]

#: The first size tried for a dynamic (non-batch) dimension; it doubles from there. Small, so
#: that verification stays cheap on large models (a VAE decoder's 4x4 latent still puts 256
#: values in each of its groups); models that need more (strided Convs, /8 UNets) grow.
START = 4
#: The second set multiplies every grown size by the first of these that the model accepts:
#: 1.5 is the smallest distinct step (cheapest), 2 and 4 keep a power-of-two divisibility.
SECOND_FACTORS = (1.5, 2, 4)
#: Growth stops when any input would hold more elements than this (64 MiB of float32).
MAX_ELEMENTS = 2**24
#: The batch sizes tried for a dynamic axis 0: 2 first (catches batch-mixing), then 1 (exports
#: that fixed the batch in a Reshape but declared it dynamic).
BATCHES = (2, 1)

FLAG_SHAPE = "--input-shape NAME=DxD"
FLAG_INPUTS = "--inputs FILE.npz"

#: onnx-ir data types onnxruntime's Python API can feed, with how we generate them.
_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64}
_INTS = {
    ir.DataType.INT8: np.int8, ir.DataType.INT16: np.int16, ir.DataType.INT32: np.int32, ir.DataType.INT64: np.int64,
    ir.DataType.UINT8: np.uint8, ir.DataType.UINT16: np.uint16, ir.DataType.UINT32: np.uint32, ir.DataType.UINT64: np.uint64,
}
#: Ops an id tensor may pass through on its way to a Gather without changing its values.
_VALUE_PRESERVING = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the user said about the verification inputs: whole shapes and/or arrays."""

    shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    feeds: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_cli(cls, input_shapes: Sequence[str] = (), inputs_file: str | os.PathLike | None = None) -> "InputSpec":
        shapes = dict(parse_input_shape(text) for text in input_shapes or ())
        feeds = {}
        if inputs_file is not None:
            path = pathlib.Path(inputs_file)
            try:
                with np.load(path, allow_pickle=False) as data:
                    feeds = {name: data[name] for name in data.files}
            except (OSError, ValueError) as e:
                raise UsageError(f"{path}: cannot read the {FLAG_INPUTS} file: {e}") from e
        return cls(shapes=shapes, feeds=feeds)

    def __bool__(self) -> bool:
        return bool(self.shapes or self.feeds)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"NAME=1x16000"`` -> ``("NAME", (1, 16000))``; the name may itself hold ``=``."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims else None
    except ValueError:
        shape = None
    if not sep or not name or shape is None or any(d < 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: expected NAME=DxDxD with non-negative integer sizes (e.g. audio=1x16000)")
    return name, shape


@dataclasses.dataclass
class InputDecl:
    """One graph input: its element type and, per axis, a static size or a symbol."""

    name: str
    dtype: np.dtype
    dims: list[int | str]  # int: static; str: a symbol shared by every axis of that name
    id_bound: int | None = None  # ids must stay below this (the Gather table it indexes)
    is_mask: bool = False

    @property
    def kind(self) -> str:
        if self.dtype.kind == "f":
            return "float"
        if self.is_mask:
            return "mask"
        if self.id_bound is not None:
            return "ids"
        return "int"


def _dims(name: str, value: ir.Value) -> list[int | str]:
    dims: list[int | str] = []
    for axis, d in enumerate(value.shape):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        elif isinstance(d, ir.SymbolicDim) and d.value:
            dims.append(d.value)
        else:
            dims.append(f"{name}:{axis}")  # an unnamed dynamic axis is a symbol of its own
    return dims


def constant_array(value: ir.Value) -> np.ndarray | None:
    """The value of an initializer or a ``Constant(value=...)`` output; None otherwise."""
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _id_bound(value: ir.Value, depth: int = 4) -> int | None:
    """The smallest table size among the Gathers (on constant tables) that ``value`` indexes."""
    bounds = []
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and use.idx == 1:
            table = constant_array(node.inputs[0]) if node.inputs[0] is not None else None
            if table is not None and table.ndim:
                axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
                bounds.append(table.shape[axis])
        elif node.op_type in _VALUE_PRESERVING and use.idx == 0 and depth > 0:
            found = _id_bound(node.outputs[0], depth - 1)
            if found is not None:
                bounds.append(found)
    return min(bounds) if bounds else None


def declarations(model: ir.Model) -> list[InputDecl]:
    """The model's runtime inputs (inputs that are also initializers are optional: skipped)."""
    decls = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        name = value.name or ""
        dtype = value.dtype
        np_type = _FLOATS.get(dtype) or _INTS.get(dtype) or (np.bool_ if dtype == ir.DataType.BOOL else None)
        decl = InputDecl(name, np.dtype(np_type) if np_type is not None else None, _dims(name, value) if value.shape is not None else [])
        if decl.dtype is not None and decl.dtype.kind in "iub":
            decl.is_mask = decl.dtype.kind == "b" or bool(_MASK_NAME.search(name))
            decl.id_bound = _id_bound(value)
        decls.append(decl)
    return decls


class Plan:
    """The feed sets to try on the original model, in order (see the module docstring)."""

    def __init__(self, model: ir.Model, spec: InputSpec | None = None, *, seed: int = 0) -> None:
        self.spec = spec or InputSpec()
        self.seed = seed
        self.decls = declarations(model)
        known = {d.name for d in self.decls}
        for name in [*self.spec.shapes, *self.spec.feeds]:
            if name not in known:
                raise UsageError(f"{name!r} is not an input of the model; its inputs are: {', '.join(sorted(known)) or 'none'}")
        self.fixed: dict[str, int] = {}  # symbol -> size the user's shapes or arrays set
        for decl in self.decls:
            given = self.spec.feeds.get(decl.name)
            shape = tuple(given.shape) if given is not None else self.spec.shapes.get(decl.name)
            if given is None and decl.dtype is None:
                raise UsageError(f"input {decl.name!r}: --verify cannot generate this input type; give it with {FLAG_INPUTS}")
            if shape is None:
                if not decl.dims and decl.dtype is not None and _declared_no_shape(model, decl.name):
                    raise UsageError(f"input {decl.name!r} declares no shape; give it with {FLAG_SHAPE} or {FLAG_INPUTS}")
                continue
            if decl.dims and len(shape) != len(decl.dims):
                raise UsageError(f"input {decl.name!r} has rank {len(decl.dims)}, the given shape {'x'.join(map(str, shape))} rank {len(shape)}")
            for declared, size in zip(decl.dims, shape):
                if isinstance(declared, int) and declared != size:
                    raise UsageError(f"input {decl.name!r}: the model fixes size {declared} where {'x'.join(map(str, shape))} gives {size}")
                if isinstance(declared, str):
                    self.fixed[declared] = size
            decl.dims = list(shape)
        free = {d for decl in self.decls for d in decl.dims if isinstance(d, str) and d not in self.fixed}
        self.batch = {d for decl in self.decls if decl.dims and isinstance(decl.dims[0], str) and len(decl.dims) > 1 for d in decl.dims[:1]} & free
        self.grown = free - self.batch

    @property
    def first_dynamic_input(self) -> str:
        for decl in self.decls:
            if any(isinstance(d, str) for d in decl.dims):
                return decl.name
        return self.decls[0].name if self.decls else "?"

    def _elements(self, sizes: Mapping[str, int]) -> int:
        return max((int(np.prod([sizes.get(d, d) if isinstance(d, str) else d for d in decl.dims])) for decl in self.decls), default=0)

    def growth(self) -> Iterator[dict[str, int]]:
        """Symbol sizes to try for the first feed set, smallest first."""
        if self.spec.feeds and all(d.name in self.spec.feeds for d in self.decls):
            yield {}
            return
        size = START
        while True:
            tried_any = False
            for batch in BATCHES if self.batch else (None,):
                sizes = {**self.fixed, **dict.fromkeys(self.grown, size), **dict.fromkeys(self.batch, batch)}
                if self._elements(sizes) > MAX_ELEMENTS:
                    continue
                tried_any = True
                yield sizes
            if not self.grown or not tried_any:
                return
            size *= 2

    def second(self, first: Mapping[str, int]) -> Iterator[dict[str, int]]:
        """Sizes for the second feed set: every grown symbol larger, the batch at its other
        value; nothing when the first set left nothing to vary (then only masks vary)."""
        batch = {s: next(b for b in BATCHES if b != first[s]) for s in self.batch}
        for factor in SECOND_FACTORS:
            sizes = {**first, **{s: int(first[s] * factor) for s in self.grown}, **batch}
            if (self.grown or self.batch) and self._elements(sizes) <= MAX_ELEMENTS:
                yield sizes
            if not self.grown:
                return

    @property
    def has_masks(self) -> bool:
        return any(d.kind == "mask" and d.name not in self.spec.feeds for d in self.decls)

    def feeds(self, sizes: Mapping[str, int], *, index: int = 0) -> dict[str, np.ndarray]:
        """Seeded arrays of the sizes; ``index`` 0 has all-ones masks, later ones a mix."""
        rng = np.random.default_rng([self.seed, index])
        feeds = {}
        for decl in self.decls:
            if decl.name in self.spec.feeds:
                feeds[decl.name] = np.asarray(self.spec.feeds[decl.name]).astype(decl.dtype or self.spec.feeds[decl.name].dtype, copy=False)
                continue
            shape = [sizes[d] if isinstance(d, str) else d for d in decl.dims]
            feeds[decl.name] = _generate(decl, shape, rng, mixed_masks=index > 0)
        return feeds


def _declared_no_shape(model: ir.Model, name: str) -> bool:
    return any(v.name == name and v.shape is None for v in model.graph.inputs)


def _generate(decl: InputDecl, shape: list[int], rng: np.random.Generator, *, mixed_masks: bool) -> np.ndarray:
    kind = decl.kind
    if kind == "float":
        # A random mean and spread per input: a normalisation sees more than N(0, 1).
        return rng.normal(rng.uniform(-1, 1), rng.uniform(0.5, 2), size=shape).astype(decl.dtype)
    if kind == "mask":
        mask = np.ones(shape, dtype=decl.dtype)
        if mixed_masks and mask.ndim and shape[-1] > 1:
            # A prefix of ones per row (padding at the end), never an empty row: what a
            # tokenizer or a batch of sequences of different lengths gives.
            lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
            mask = (np.arange(shape[-1]) < lengths[..., None]).astype(decl.dtype)
        return mask
    if kind == "ids":
        return rng.integers(0, decl.id_bound, size=shape).astype(decl.dtype)
    info = np.iinfo(decl.dtype)
    if info.bits == 8:  # image-like data: the whole range
        return rng.integers(info.min, info.max + 1, size=shape, dtype=decl.dtype)
    return rng.integers(0, 2, size=shape).astype(decl.dtype)
