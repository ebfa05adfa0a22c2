"""Verification: run the original and the fused model in onnxruntime (CPU) on inputs the
model accepts (:mod:`.inputs`) and judge both against the truth, not only against each other.

How it decides:

1. *Layers.* Every fused GroupNormalization node of the fused model's main graph (our op, or the
   standard op a target lowered it to) has its input ``X`` and output ``Y`` fetched as extra
   outputs; the fusion keeps the names of the exported subgraph's input and final output, so
   the same two values are fetched from the original. Each model's ``Y`` is compared with the
   float64 NumPy reference (:func:`ops.group_normalization`, with the fused node's groups, axis,
   epsilon, gamma and beta) computed from *that model's own* ``X``: each layer's error is its
   own, not what earlier layers passed on. (a) holds when every fused layer is within the
   tolerance of its reference, or at least as close to it as the original's subgraph is. A
   layer a target moved channels first (``NAME_nchw``) is found in the original as ``NAME``,
   channels last, and compared in the fused layout.
2. *Outputs.* (b) holds when every model output of the fused model agrees with the original's
   within :data:`VERIFY_TOLERANCES`. Positions where the original is not finite (NaN, +/-Inf)
   are compared as positions: the same positions pass with a note, others fail.
3. *Verdict.* (a) and (b): passed. (a) but not (b), where some original layers are more than
   :data:`SUSPECT_RATIO` of the tolerance from their reference and :data:`SUSPECT_MARGIN` times
   further from it than the fused ones: "passed: more accurate
   than the export" -- but only after each of those original subgraphs, evaluated in float64
   (onnx's ReferenceEvaluator on a float64 copy of just that subgraph, fed the shapes it reads
   from outside it as the run computed them), agrees with the reference: that proves the fused
   node's configuration is the export's and only the export's float32 arithmetic is off (a
   fusion with a wrong epsilon or gamma fails here). (a) but not (b) with no such layer: the
   original is run once more with onnxruntime's graph optimisations off (another float32
   summation order of the same model); "passed: within the export's own float32 noise" when
   every output out of tolerance differs from the original by at most :data:`NOISE_FACTOR`
   times the original's difference from itself. Anything else: FAILED, naming the output or
   layer.

Cost: onnxruntime gets each model's graph alone, its weights memory-mapped from external
data (a file's own data in place; weights held in memory written once to a temporary folder),
so no serialised copy of the weights is held and nothing over 2 GB is serialised. onnxruntime
keeps every fetched layer value alive to the end of a run, so the layers are fetched in
batches of at most :data:`FETCH_BUDGET_BYTES`: the last layers' batch runs the whole model
(its outputs, and the input sizes it accepts), each earlier batch only the nodes before its
layers. Sessions run one at a time (default thread count, no memory arena, no memory
pattern, no prepacked weight copies), each block of :data:`MMAP_THRESHOLD_BYTES` or more they
allocate mapped on its own so that it goes back to the system when freed (glibc's malloc
would keep it in its heaps); the original's channels-last layer input is fetched after the
export's Transpose, so the Conv output before it need not be kept too
(:func:`_channels_last_input`); the float64 work is one NumPy reference per layer per
set, a few groups at a time, plus a subgraph evaluation only for the layers a "more accurate"
verdict rests on (node by node, each value dropped after its last use); the noise run only on
its path, fetching the outputs alone (less than the layer runs before it).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import pathlib
import sys
import tempfile
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from ..ops import contract
from ..ops.reference import group_normalization
from ..ops.tolerances import Tolerance
from . import _shapes
from . import inputs as inputs_module
from ._graphs import is_ours
from .errors import ModelFileError, UsageError, model_file_error, one_line
from . import io
from .report import LayerCheck, OutputCheck, Verification
from .targets.ort_cpu import CHANNELS_FIRST_SUFFIX

__all__ = ["verify", "VERIFY_TOLERANCES", "CONFIG_TOLERANCE", "MORE_ACCURATE", "SUSPECT_RATIO", "SUSPECT_MARGIN", "WITHIN_NOISE", "NOISE_FACTOR", "FETCH_BUDGET_BYTES", "MMAP_THRESHOLD_BYTES", "HEAP_THRESHOLD_BYTES"]

logger = logging.getLogger(__name__)

#: Graph against graph, not op against op: a GroupNormalization feeds Convs and more
#: GroupNormalizations, which pass on (and may amplify) the last-bit differences between
#: the exporter's algorithm (often E[x^2] - E[x]^2 in the input type) and ours. float32:
#: 1e-4 (~800 ulp), float16/bfloat16: 10 ulp of the format (1e-2, 8e-2), float64: 1e-9.
#: The same bounds judge one layer against its float64 reference.
VERIFY_TOLERANCES = {
    "float32": Tolerance(rtol=1e-4, atol=1e-4),
    "float16": Tolerance(rtol=1e-2, atol=1e-2),
    "bfloat16": Tolerance(rtol=8e-2, atol=8e-2),
    "float64": Tolerance(rtol=1e-9, atol=1e-9),
}
_DEFAULT = Tolerance(rtol=1e-4, atol=1e-4)
#: An original subgraph evaluated in float64 against the float64 reference: both are exact to
#: ~1e-16 times the cancellation of a one-pass variance (|mean|^2 / var, up to ~1e8 on real
#: activations), so 1e-7 leaves room for that while any change of epsilon, gamma or beta a
#: fusion could get wrong (an epsilon off by 1e-6 of the variance or more) stands out.
CONFIG_TOLERANCE = Tolerance(rtol=1e-7, atol=1e-7)
MORE_ACCURATE = "passed: more accurate than the export"
#: An original layer the "more accurate" verdict may rest on: at least this share of the
#: tolerance from its float64 reference, and SUSPECT_MARGIN times further from it than the
#: fused layer. Half the tolerance: the outputs are judged with the same tolerance as one
#: layer, so an export spending half of it in one layer misses it after any 2x amplification
#: by the layers after it (benchmarks/verify_noise.py: the Keras SD3 VAE exports' layers reach
#: 0.63-1.59 of it, ours 0.04-0.11, the outputs 0.9-1.12). Each such layer's original subgraph
#: is still checked in float64 before the verdict is given (its input waits on disk meanwhile).
SUSPECT_RATIO = 0.5
SUSPECT_MARGIN = 2.0
WITHIN_NOISE = "passed: within the export's own float32 noise"
#: How far the fused model's outputs may drift from the original's, in multiples of the
#: export's own float32 noise floor (:func:`_noise_floor`: the original against itself with
#: onnxruntime's graph optimisations off), when every layer passed (a) and none of the
#: original's is suspect. The floor is the distance between two float32 evaluations of the
#: export; a fused model no worse an evaluation than the original is within the floor of the
#: true values where the original is, so within twice it of the original (triangle
#: inequality). Measured (benchmarks/verify_noise.py --noise-only): torch exports drift
#: 0.9-1.44x their floor, the deep model of tests/test_verify.py 1.0x; there, gammas off by
#: 2e-5 in every layer 4.5x, a wrong epsilon or gamma 35-1000x.
NOISE_FACTOR = 2.0
_ORT_MISSING = "--verify needs onnxruntime: pip install onnx-groupnorm[ort]"
#: Largest original subgraph evaluated in float64 (the exporters write 10-40 nodes per layer).
_MAX_SUBGRAPH_NODES = 400
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise UsageError(_ORT_MISSING) from e
    return onnxruntime


def _tolerance(dtype) -> Tolerance:
    return VERIFY_TOLERANCES.get(np.dtype(dtype).name, _DEFAULT)


# -- the two models ---------------------------------------------------------------------------


class _Model:
    """A model to run: a ModelProto, an onnx_ir.Model or a path, with its onnx-ir view (for
    reading the graph) and the means to open an onnxruntime session with extra outputs.

    onnxruntime always gets the graph alone, as bytes, with the weights in external data that
    it memory-maps: a path's own data files in place (never copied) when its weights are
    external, else one data file written once into a temporary folder (``.ogn-<pid>-*`` in
    ``workdir``, removed by ``stack``). No serialised copy of the weights is ever held in
    Python, and nothing over 2 GB is serialised.
    """

    def __init__(self, model: onnx.ModelProto | ir.Model | str | os.PathLike, role: str, source: str,
                 stack: contextlib.ExitStack, workdir: str | os.PathLike | None = None) -> None:
        self.role = role
        path = None
        if isinstance(model, (str, os.PathLike)):
            path = pathlib.Path(model)
            self.name = str(path)
            try:  # the graph, its external tensors lazy (memory-mapped when read)
                proto = onnx.load(os.fspath(path), load_external_data=False)
                self.ir = ir.from_proto(proto)
                ir.external_data.set_base_dir(self.ir.graph, path.resolve().parent)
            except Exception as e:
                raise (model_file_error(e, path) or ModelFileError(f"{path}: cannot load the {role} model: {e}")) from e
            del proto
        elif isinstance(model, onnx.ModelProto):
            self.name = source or f"the {role} model"
            try:
                self.ir = ir.from_proto(model)
            except Exception as e:  # two nodes writing one value, a malformed tensor, ...
                raise _LoadError(f"{self.name}: cannot read the {role} model: {one_line(e)}") from e
        elif isinstance(model, ir.Model):
            self.ir, self.name = model, source or f"the {role} model"
        else:
            raise TypeError(f"verify takes an onnx.ModelProto, onnx_ir.Model or path, not {type(model).__name__}")
        self.proto, self.folder = self._graph_for_onnxruntime(path, stack, workdir)
        self.values = {v.name: v for v in self.ir.graph.inputs}
        for node in self.ir.graph:
            self.values.update((v.name, v) for v in node.outputs if v.name)
        self.outputs = [v.name for v in self.ir.graph.outputs]

    def _graph_for_onnxruntime(self, path: pathlib.Path | None, stack: contextlib.ExitStack,
                               workdir: str | os.PathLike | None) -> tuple[onnx.ModelProto, pathlib.Path | None]:
        """The graph proto onnxruntime gets (weights external, small tensors inline) and the
        folder its external data is read from."""
        folders = io.external_folders(self.ir)
        try:
            if io.in_memory_bytes(self.ir) <= io.INLINE_WEIGHTS_BYTES and len(folders) <= 1:
                folder = next(iter(folders), None)
                proto = ir.to_proto(self.ir)
                if folder is not None:
                    _load_small_external_tensors(proto, folder)
                return proto, folder
            # Weights in memory (or in several folders): one data file, written once.
            tmp = stack.enter_context(io.temp_dir(workdir if workdir is not None else tempfile.gettempdir()))
            ir.save(self.ir, tmp / "model.onnx", external_data="model.onnx.data",
                    size_threshold_bytes=io.INLINE_TENSOR_BYTES, alignment=io.MMAP_ALIGNMENT)
            if path is not None:  # our own view: read it from the copy, lazily, and drop the file's weights
                self.ir = ir.load(tmp / "model.onnx")
            return onnx.load(os.fspath(tmp / "model.onnx"), load_external_data=False), tmp
        except (ModelFileError, UsageError):
            raise
        except Exception as e:
            raise _LoadError(f"{self.name}: cannot prepare the {self.role} model for onnxruntime: {one_line(e)}") from e

    def _graph_bytes(self, extra: Sequence[str], whole: bool) -> bytes:
        """The graph with ``extra`` as graph outputs, serialised: the whole graph (its outputs
        too), or only the nodes ``extra`` needs (a batch of layers early in the graph runs
        the part of the model before them)."""
        if whole:
            added = len(self.proto.graph.output)
            self.proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra if n not in self.outputs)
            try:
                return self.proto.SerializeToString()
            finally:
                del self.proto.graph.output[added:]
        graph = self.proto.graph
        nodes, needed = [], set(extra)
        for node in reversed(graph.node):
            if needed.intersection(node.output):
                nodes.append(node)
                needed.update(node.input)
                needed.update(_subgraph_names(node))
        pruned = onnx.ModelProto()
        pruned.CopyFrom(self.proto)
        del pruned.graph.node[:], pruned.graph.output[:]
        pruned.graph.node.extend(reversed(nodes))
        pruned.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
        kept = [t for t in pruned.graph.initializer if t.name in needed]
        del pruned.graph.initializer[:]
        pruned.graph.initializer.extend(kept)
        return pruned.SerializeToString()

    def open(self, model: bytes, optimized: bool = True):
        """An onnxruntime session of ``model`` (this model's graph or a part of it); with
        ``optimized`` False, graph optimisations off (the noise run, :func:`_noise_floor`)."""
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if not optimized:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4  # sizes the model refuses are expected while growing
        # Default thread count; threads sleep when idle instead of spinning (verification
        # often shares the machine with the user's other work).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Memory (benchmarks/fuse_memory.py --model): no arena holding freed activations, no
        # prepacked second copy of the MatMul weights (the weights stay memory-mapped).
        options.enable_cpu_mem_arena = False
        # No memory pattern: each activation is allocated and freed as the run goes instead of
        # one block planned for them all (a session here runs once or a few times: nothing to
        # reuse; the Keras SD3 VAE decoder's largest part: ~100 MiB less at its peak).
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.disable_prepacking", "1")
        if self.folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", os.fspath(self.folder))
        try:
            with _large_blocks_mapped():  # its own copies of weights (reordered Conv weights)
                return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise _LoadError(f"{self.name}: onnxruntime cannot load the {self.role} model: {one_line(e)}") from e

    @contextlib.contextmanager
    def session(self, extra: Sequence[str], whole: bool = True, optimized: bool = True) -> Iterator[Callable[[dict], dict[str, np.ndarray]]]:
        """A runner ``feeds -> {name: array}`` for ``extra`` and, when ``whole``, the graph
        outputs (else only the nodes ``extra`` needs run)."""
        names = list(dict.fromkeys([*self.outputs, *extra] if whole else extra))
        session = self.open(self._graph_bytes(names, whole), optimized)
        fetch = [n for n in names if n]
        held = [session]  # emptied on exit: the session (and its memory) goes even if the runner stays
        del session
        try:
            yield lambda feeds: _run(held[0], fetch, feeds)
        finally:
            held.clear()
            _trim()


#: While onnxruntime creates a session or runs one, heap blocks of at least this many bytes
#: are mapped on their own (mmap), so that each goes back to the system when freed. glibc
#: starts at 128 KiB but raises its threshold to the size of each mapped block freed (up to
#: 32 MiB): the 1-32 MiB activations then come from heaps that keep what is freed, in pieces
#: the next values seldom fit, and the run's larger values are added on top. Measured
#: (benchmarks/verify_rss_trace.py, the Keras SD3 VAE decoder's --verify): peak 890-1075 MiB
#: with glibc's threshold, 680-690 MiB with 1 or 2 MiB here.
MMAP_THRESHOLD_BYTES = 2**20
#: The threshold meanwhile (our NumPy work): glibc's own ceiling on 64-bit, which its sliding
#: threshold reaches after the first large free. The float64 layer checks allocate the same
#: few sizes over and over (:data:`_CHUNK_ELEMENTS`): from the heap they are reused; each
#: mapped afresh, they cost ~1.5 ms of page faults per 8 MiB (~14 s of system time there).
HEAP_THRESHOLD_BYTES = 32 * 2**20
#: glibc's sliding threshold sets the heap's trim threshold (free memory at its top given back
#: at once) to twice itself; fixed thresholds leave it at 128 KiB, and the heap would shrink
#: and grow again, with page faults, for every chunk of the layer checks. The same as glibc's.
_TRIM_THRESHOLD_BYTES = 2 * HEAP_THRESHOLD_BYTES
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def _mmap_threshold(size: int) -> None:
    """Fix glibc's mmap threshold at ``size`` (process-wide; glibc offers no way back to its
    sliding threshold) and its trim threshold as its sliding one would. Elsewhere (no glibc)
    nothing to do."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None)
            libc.mallopt(_M_MMAP_THRESHOLD, size)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


@contextlib.contextmanager
def _large_blocks_mapped() -> Iterator[None]:
    """Inside: onnxruntime's large blocks mapped on their own (:data:`MMAP_THRESHOLD_BYTES`),
    after the heap our NumPy work kept for reuse is given back."""
    _trim()
    _mmap_threshold(MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        _mmap_threshold(HEAP_THRESHOLD_BYTES)


def _run(session, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``names`` computed by ``session`` from ``feeds``."""
    with _large_blocks_mapped():
        return dict(zip(names, session.run(names, feeds)))


def _trim() -> None:
    """Give the heap's free pages back to the system: glibc keeps what a closed session (or a
    run's freed values) held, and the next session would add to it (~200 MiB on a 190 MB
    decoder). Elsewhere (no glibc) nothing to do."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every value name the subgraphs of ``node`` (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_names(inner))
    return names


class _Unsegmentable(Exception):
    """A value crossing a cut is not a tensor onnxruntime can be fed: run the model whole."""


class _Segments:
    """``model`` cut after each batch's layers into consecutive parts of its node list, each
    run in a session of its own: part k runs its nodes once, fed the model inputs and the
    values earlier parts computed that it reads (kept in between), and returns its batch's
    layer values and what later parts need. One run through the parts costs one run of the
    model; onnxruntime holds the fetched values of one batch at a time, and one part's
    session (opened for each run: the values fed across a cut are typed from that run)."""

    def __init__(self, model: _Model, fetches: list[list[str]]) -> None:
        self.model = model
        graph = model.proto.graph
        self.nodes = list(graph.node)
        self.produced = {o: i for i, node in enumerate(self.nodes) for o in node.output if o}
        reads = [{n for n in (*node.input, *_subgraph_names(node)) if n} for node in self.nodes]
        self.reads = reads
        last_use: dict[str, int] = {}
        for i, names in enumerate(reads):
            for n in names:
                last_use[n] = i
        outputs = set(model.outputs)
        if any(n not in self.produced and n not in {v.name for v in graph.input} for n in outputs):
            raise _Unsegmentable("a model output is an initializer")
        self.parts = []  # (first node, last node, fetch here, names needed after)
        start = 0
        for k, fetch in enumerate(fetches):
            end = len(self.nodes) - 1 if k == len(fetches) - 1 else max([start - 1, *(self.produced.get(n, -1) for n in fetch)])
            later = set().union(*fetches[k + 1:]) | outputs
            needed_after = {n for n, i in last_use.items() if i > end} | later
            self.parts.append((start, end, list(fetch), needed_after))
            start = end + 1

    def _session(self, k: int, carried: dict[str, np.ndarray], outputs: list[str]):
        start, end, _, _ = self.parts[k]
        nodes = self.nodes[start:end + 1]
        reads = set().union(*self.reads[start:end + 1])
        part = onnx.ModelProto()
        part.CopyFrom(self.model.proto)
        graph = part.graph
        del graph.node[:], graph.output[:]
        graph.node.extend(nodes)
        kept = [t for t in graph.initializer if t.name in reads]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for name in sorted(n for n in reads if n in carried):
            array = carried[name]
            try:
                elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            except Exception as e:
                raise _Unsegmentable(f"{name}: {array.dtype}") from e
            graph.input.append(onnx.helper.make_tensor_value_info(name, elem, [None] * array.ndim))
        graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
        try:
            return self.model.open(part.SerializeToString())
        except _LoadError as e:  # the whole model's session says whose fault it is
            raise _Unsegmentable(one_line(e)) from e

    def run(self, feeds: dict[str, np.ndarray], each: Callable[[int, dict], None]) -> dict[str, np.ndarray]:
        """Run every part on ``feeds``; ``each(k, values)`` gets part k's batch values;
        returns the model outputs."""
        carried: dict[str, np.ndarray] = {}
        for k, (start, end, fetch, needed_after) in enumerate(self.parts):
            inside = {o for node in self.nodes[start:end + 1] for o in node.output if o}
            outputs = list(dict.fromkeys([*(n for n in fetch if n in inside), *sorted(inside & needed_after)]))
            results: dict[str, np.ndarray] = {}
            if outputs:
                # One session at a time, opened for this run: a held session keeps its
                # activations' memory (onnxruntime caches the run's memory pattern).
                session = self._session(k, carried, outputs)
                reads = set().union(*self.reads[start:end + 1])
                part_feeds = {**feeds, **{n: carried[n] for n in reads if n in carried}}
                try:
                    results = _run(session, outputs, part_feeds)
                finally:
                    del session
                    _trim()
            for n in outputs:
                if not isinstance(results[n], np.ndarray):
                    raise _Unsegmentable(f"{n} is not a tensor")
            values = {n: results.get(n, carried.get(n, feeds.get(n))) for n in fetch}
            each(k, {n: v for n, v in values.items() if v is not None})
            carried.update((n, results[n]) for n in outputs if n in needed_after)
            carried = {n: v for n, v in carried.items() if n in needed_after}
            del results, values
        return {n: carried.get(n, feeds.get(n)) for n in self.model.outputs}



class _LoadError(Exception):
    pass




def _load_small_external_tensors(proto: onnx.ModelProto, folder: pathlib.Path) -> None:
    from onnx import external_data_helper

    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            if info.length is not None and info.length <= io.INLINE_TENSOR_BYTES:
                external_data_helper.load_external_data_for_tensor(tensor, os.fspath(folder))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]


# -- the fused layers -------------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
    """One fused node: what to fetch and how to compute its float64 reference."""

    node: str
    x: str
    y: str
    groups: int
    axis: int
    epsilon: float
    activation: int
    params: list[str | None]  # gamma, beta value names (None: absent)
    constants: dict[str, np.ndarray]  # the params that are constants, by name
    in_original: bool = False
    #: The original's names of X and Y: ``x``/``y``, or the channels-last value a target moved
    #: channels first (:data:`_CHANNELS_FIRST_SUFFIX`); then ``x_channels_last``/``channels_last``.
    original_x: str = ""
    original_y: str = ""
    x_channels_last: bool = False
    channels_last: bool = False
    #: Shapes the original subgraph reads from outside it (``Shape`` of another value):
    #: fetched with the layer so that its float64 evaluation can be fed them.
    shapes: list[str] = dataclasses.field(default_factory=list)

    @property
    def fetched(self) -> list[str]:
        """The values a session must return for this layer."""
        return [n for n in (self.x, self.y, *self.params) if n and n not in self.constants]

    @property
    def original_fetched(self) -> list[str]:
        """The values the original's session must return for this layer."""
        return [n for n in (self.original_x or self.x, self.original_y, *self.params, *self.shapes) if n and n not in self.constants]

    def original_input(self, x: np.ndarray) -> np.ndarray:
        """The original's X in the fused layer's layout (channels moved first where needed)."""
        return np.moveaxis(x, -1, 1) if self.x_channels_last and x.ndim > 2 else x

    def original_output(self, y: np.ndarray) -> np.ndarray:
        """The original's Y in the fused layer's layout (channels moved first where needed)."""
        return np.moveaxis(y, -1, 1) if self.channels_last and y.ndim > 2 else y

    def reference(self, x: np.ndarray, values: dict[str, np.ndarray]) -> np.ndarray:
        gamma, beta = (None if n is None else np.asarray(self.constants.get(n, values.get(n)), np.float64) for n in self.params)
        channels = x.shape[self.axis]
        groups = channels if self.groups == -1 else self.groups
        # opset-18 standard GroupNormalization: scale/bias per group; repeat them per channel.
        gamma, beta = (p if p is None or p.size != groups or groups == channels else np.repeat(p.reshape(-1), channels // groups) for p in (gamma, beta))
        gamma, beta = (None if p is None else p.reshape(-1) for p in (gamma, beta))
        return group_normalization(x.astype(np.float64), gamma, beta, groups=groups, axis=self.axis, epsilon=self.epsilon, activation=self.activation)

    def diff(self, x: np.ndarray, y: np.ndarray, values: dict[str, np.ndarray], tolerance: Tolerance | None = None) -> _Diff:
        """``y`` against the reference of ``x`` (within ``tolerance``, default: ``y``'s type's),
        a few groups at a time: groups are independent, and the float64 temporaries of a whole
        large layer would cost ~10x it."""
        tolerance = tolerance or _tolerance(y.dtype)
        axis = self.axis % x.ndim if x.ndim else 0
        channels = x.shape[axis] if x.ndim else 0
        groups = channels if self.groups == -1 else self.groups
        if x.ndim < 2 or groups <= 0 or channels % groups or x.size <= _CHUNK_ELEMENTS:
            return _diff(y, self.reference(x, values), tolerance)
        per_group = channels // groups
        step = max(1, groups * _CHUNK_ELEMENTS // x.size)  # groups per chunk
        params = [self.constants.get(n, values.get(n)) if n else None for n in self.params]
        parts = []
        for g in range(0, groups, step):
            take = slice(g * per_group, min(groups, g + step) * per_group)
            chunk = _Layer(self.node, self.x, self.y, min(groups, g + step) - g, axis, self.epsilon, self.activation,
                           ["gamma" if params[0] is not None else None, "beta" if params[1] is not None else None], {})
            sub = {k: _channel_slice(np.asarray(p, np.float64), take, groups, channels) for k, p in zip(("gamma", "beta"), params) if p is not None}
            index = (slice(None),) * axis + (take,)
            parts.append(_diff(y[index], chunk.reference(x[index], sub), tolerance))
        return _Diff(max(p.max_abs for p in parts), max(p.ratio for p in parts), all(p.same_positions for p in parts), sum(p.nonfinite for p in parts))


#: Layers above this many elements are compared a few groups at a time (bounds the float64
#: temporaries to ~10 x 8 bytes x this: 80 MiB).
_CHUNK_ELEMENTS = 2**20


def _channel_slice(param: np.ndarray, take: slice, groups: int, channels: int) -> np.ndarray:
    """gamma/beta of the channels in ``take`` (per-group parameters, opset 18: of those groups)."""
    flat = param.reshape(-1)
    if flat.size == groups and groups != channels:
        per_group = channels // groups
        return flat[take.start // per_group : take.stop // per_group]
    return flat[take]


def _layers(model: ir.Model) -> list[_Layer]:
    """Our op's nodes and standard GroupNormalization nodes in the main graph (subgraphs
    and functions are judged by the model outputs only)."""
    layers = []
    for node in model.graph:
        ours = is_ours(node)
        standard = node.op_type == "GroupNormalization" and node.domain in ("", "ai.onnx")
        if not (ours or standard) or not node.inputs or node.inputs[0] is None or not node.outputs[0].name:
            continue
        attrs = node.attributes
        params = [v for v in list(node.inputs[1:3]) + [None] * (3 - len(node.inputs))][:2]
        if ours:
            groups = attrs["groups"].as_int() if "groups" in attrs else contract.DEFAULT_GROUPS
            axis = attrs["axis"].as_int() if "axis" in attrs else contract.DEFAULT_AXIS
            epsilon = attrs["epsilon"].as_float() if "epsilon" in attrs else contract.DEFAULT_EPSILON
            activation = attrs["activation"].as_int() if "activation" in attrs else 0
        else:
            groups, axis, activation = attrs["num_groups"].as_int(), 1, 0
            epsilon = attrs["epsilon"].as_float() if "epsilon" in attrs else 1e-5
        constants = {}
        for p in params:
            if p is not None and (array := inputs_module.constant_array(p)) is not None:
                constants[p.name] = array
        layers.append(_Layer(
            node=node.name or node.outputs[0].name, x=node.inputs[0].name, y=node.outputs[0].name,
            groups=groups, axis=axis, epsilon=epsilon, activation=activation,
            params=[None if p is None else p.name for p in params], constants=constants,
        ))
    return layers


# -- comparing arrays -------------------------------------------------------------------------


@dataclasses.dataclass
class _Diff:
    max_abs: float
    ratio: float
    same_positions: bool  # the non-finite positions (and kinds) agree
    nonfinite: int  # non-finite values in the expected array


def _diff(actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> _Diff:
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    if a.shape != b.shape:
        return _Diff(float("inf"), float("inf"), True, 0)
    if a.size == 0:
        return _Diff(0.0, 0.0, True, 0)
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    same, nonfinite = True, 0
    if not (finite_a.all() and finite_b.all()):  # the rare case: compare the positions and kinds
        same = bool(np.array_equal(finite_a, finite_b))
        if same:  # NaN where NaN, +Inf where +Inf, -Inf where -Inf
            bad_a, bad_b = a[~finite_a], b[~finite_b]
            same = bool(np.array_equal(np.isnan(bad_a), np.isnan(bad_b)) and np.array_equal(bad_a > 0, bad_b > 0))
        nonfinite = int((~finite_b).sum())
        keep = finite_a & finite_b
        if not keep.any():
            return _Diff(0.0, 0.0, same, nonfinite)
        a, b = a[keep], b[keep]
    err = np.abs(a - b)
    ratio = err / (tolerance.atol + tolerance.rtol * np.abs(b))
    return _Diff(float(err.max()), float(ratio.max()), same, nonfinite)


def _positions(a: np.ndarray) -> str:
    """A short description of where ``a`` is not finite."""
    bad = ~np.isfinite(np.asarray(a, np.float64))
    first = [tuple(int(i) for i in idx) for idx in np.argwhere(bad)[:3]]
    kinds = [f"{int(np.isnan(a).sum())} NaN", f"{int(np.isposinf(a).sum())} +Inf", f"{int(np.isneginf(a).sum())} -Inf"]
    return f"{int(bad.sum())} of {bad.size} ({', '.join(k for k in kinds if not k.startswith('0 '))}; first at {first})"


# -- the float64 evaluation of one original subgraph -------------------------------------------


_SHAPE_OPS = ("Shape", "Size")


def _outside_shapes(model: ir.Model, x: str, y: str) -> list[str]:
    """The outputs of ``Shape``/``Size`` nodes of values other than ``x`` that the original's
    nodes from ``x`` to ``y`` read (tf2onnx reshapes back to the batch size of the Conv
    before the layer's Transpose): small integer tensors to fetch and feed."""
    def outside(node: ir.Node) -> bool:
        return node.op_type in _SHAPE_OPS and node.domain in ("", "ai.onnx") and node.inputs[0] is not None and node.inputs[0].name != x

    nodes, _ = _walk_back(model, {x}, y, _MAX_SUBGRAPH_NODES * 4 + 1, stop=outside)
    return [node.outputs[0].name for node in nodes if outside(node)]


#: graph -> {value name: the node that makes it}: built once per graph, not once per layer (with
#: a thousand layers, once per layer made verification quadratic in the model's size).
_PRODUCERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _producers(graph: ir.Graph) -> dict[str, ir.Node]:
    """Value name -> its producing node in ``graph`` (verification never edits the graphs it reads)."""
    found = _PRODUCERS.get(graph)
    if found is None:
        found = _PRODUCERS[graph] = {out.name: node for node in graph for out in node.outputs}
    return found


def _walk_back(model: ir.Model, start: Collection[str], y: str, limit: int,
               stop: Callable[[ir.Node], bool] = lambda node: False) -> tuple[list[ir.Node], bool]:
    """The original's nodes met going back from value ``y`` to the values ``start`` (never past
    those, an initializer, or a node ``stop`` is true of), each once, visiting at most ``limit``
    values; and whether the walk ended within the limit (a layer's subgraph) or was cut short."""
    producers = _producers(model.graph)
    nodes, stack, seen = {}, [y], set()
    while stack:
        name = stack.pop()
        if name in seen or name in start or not name or name in model.graph.initializers:
            continue
        if len(seen) >= limit:
            return list(nodes), False
        seen.add(name)
        node = producers.get(name)
        if node is None or node in nodes:
            continue
        nodes[node] = None
        if not stop(node):
            stack.extend(v.name for v in node.inputs if v is not None)
    return list(nodes), True


def _subgraph64(model: ir.Model, x: str, y: str, fed: dict[str, np.ndarray] | None = None) -> onnx.ModelProto | None:
    """The original's nodes from ``x`` to ``y`` as a float64 model, or None when they depend on
    anything but ``x``, the values ``fed`` (shapes, as they are) and constants (or hold subgraphs)."""
    fed = fed or {}
    nodes, whole = _walk_back(model, {x, *fed}, y, _MAX_SUBGRAPH_NODES + 1)
    if not whole or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in nodes for a in n.attributes.values()):
        return None
    made = {v.name for n in nodes for v in n.outputs}
    if y not in made:
        return None
    inits = {}
    for name in (v.name for n in nodes for v in n.inputs if v is not None and v.name):
        if name in made or name == x or name in fed:
            continue
        if name not in model.graph.initializers:  # a graph input or a value from outside the layer
            return None
        inits[name] = model.graph.initializers[name]
    order = {node: i for i, node in enumerate(model.graph)}
    protos = [ir.serde.serialize_node(n) for n in sorted(nodes, key=order.__getitem__)]
    tensors = []
    for name, value in inits.items():
        if value.const_value is None:
            return None
        array = value.const_value.numpy()
        tensors.append(onnx.numpy_helper.from_array(array.astype(np.float64) if array.dtype.kind == "f" else array, name))
    for node in protos:
        _to_float64(node)
    inputs = [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.DOUBLE, None)]
    inputs += [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), None) for n, a in fed.items()]
    graph = onnx.helper.make_graph(protos, "subgraph64", inputs, [onnx.ValueInfoProto(name=y)], tensors)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    result = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    result.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return result


def _to_float64(node: onnx.NodeProto) -> None:
    """Every float constant, Cast and fill value of ``node`` in float64 instead."""
    for attr in node.attribute:
        if attr.name == "to" and node.op_type == "Cast" and attr.i in _FLOAT_TYPES:
            attr.i = onnx.TensorProto.DOUBLE
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _FLOAT_TYPES:
            array = onnx.numpy_helper.to_array(attr.t).astype(np.float64)
            attr.t.CopyFrom(onnx.numpy_helper.from_array(array, attr.t.name))
        elif attr.type == onnx.AttributeProto.FLOAT and node.op_type == "Constant" and attr.name == "value_float":
            value = attr.f
            node.attribute.remove(attr)
            node.attribute.append(onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(np.asarray(value, np.float64))))
            return


def _evaluate(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The single output of ``model`` (a subgraph from :func:`_subgraph64`, no nested graphs)
    by onnx's ReferenceEvaluator, one node at a time: each value is dropped after its last
    use (the evaluator run on the whole graph keeps every intermediate to the end: ~10 float64
    copies of a layer, the peak of a large decoder's --verify). Same ops, same NumPy: the same
    result as evaluating the whole graph at once."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opsets = {o.domain: o.version for o in model.opset_import}
    functions = list(model.functions)
    (output,) = [o.name for o in graph.output]
    values = {**feeds, **{t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}}
    given = set(values)  # the caller's arrays and the constants are never written over
    del feeds
    nodes = _shapes_first(list(graph.node))
    last_use = {name: i for i, node in enumerate(nodes) for name in node.input if name}
    for i, node in enumerate(nodes):
        if (results := _in_place(node, values, last_use, i, given)) is None:
            evaluator = ReferenceEvaluator(node, opsets=opsets, functions=functions or None)
            results = evaluator.run(None, {name: values[name] for name in node.input if name})
        values.update((name, value) for name, value in zip(node.output, results) if name == output or name in last_use)
        del results
        for name in node.input:
            if name != output and last_use.get(name) == i:
                values.pop(name, None)
    return values[output]


#: Elementwise float ops the float64 evaluation may compute into an input's buffer: the
#: reference evaluator's own NumPy function, so the same values, one layer-sized copy less.
_IN_PLACE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}


def _in_place(node: onnx.NodeProto, values: dict[str, np.ndarray], last_use: dict[str, int], i: int, given: set[str]) -> list[np.ndarray] | None:
    """``node``'s result written over its first input, when that is a float64 array computed
    here (not ``given``), at its last use, owning its memory, shared with no other value, of
    the result's shape; else None."""
    if node.op_type not in _IN_PLACE or node.domain not in ("", "ai.onnx") or len(node.input) != 2 or len(node.output) != 1:
        return None
    if node.input[0] in given:
        return None
    a, b = (values.get(n) for n in node.input)
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype == np.float64):
        return None
    if last_use.get(node.input[0]) != i or a.base is not None or not a.flags.writeable or a.shape != np.broadcast_shapes(a.shape, b.shape):
        return None
    if any(v is a or getattr(v, "base", None) is a for n, v in values.items() if n != node.input[0]):
        return None
    return [_IN_PLACE[node.op_type](a, b, out=a)]


def _shapes_first(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` (in topological order) with the shape computations first: ``Shape``/``Size``
    nodes of the graph's inputs and the nodes that read only their results (or initializers),
    each part in its order (still topological). tf2onnx reads the layer input's shape only for the final Reshape;
    computed first, the input is dropped at its last real use instead of at the end."""
    produced = {o for node in nodes for o in node.output}
    small: set[str] = set()
    first, rest = [], []
    for node in nodes:
        read = [n for n in node.input if n in produced]
        if all(n in small for n in read) and (read or node.op_type in _SHAPE_OPS):
            small.update(node.output)
            first.append(node)
        else:
            rest.append(node)
    return first + rest


def _confirmed(model: ir.Model, layer: _Layer, x: np.ndarray | Callable[[], np.ndarray], values: dict[str, np.ndarray]) -> tuple[bool | None, str]:
    """Does the original's subgraph, in float64, compute the fused node's configuration?
    (True, ""), (False, why) or, when it cannot be evaluated, (None, why). ``x``: the original's
    layer input, in the original's layout, or a function reading it (called twice, so that it is
    not held while the subgraph is evaluated)."""
    read = x if callable(x) else lambda: x
    _trim()  # the heap the layer checks kept for reuse: this evaluation is verification's peak
    fed = {n: values[n] for n in layer.shapes if n in values}
    x_name = layer.original_x or layer.x
    sub = _subgraph64(model, x_name, layer.original_y or layer.y, fed)
    if sub is None:
        return None, f"layer {layer.node}: its original subgraph depends on more than its input; cannot evaluate it in float64"
    try:
        y64 = _evaluate(sub, {x_name: read().astype(np.float64), **fed})
        y64 = layer.original_output(y64)
        x = layer.original_input(read())
    except Exception as e:  # an op the reference evaluator lacks, or one without float64
        return None, f"layer {layer.node}: cannot evaluate its original subgraph in float64 ({one_line(e)})"
    # A few groups at a time (:meth:`_Layer.diff`): the whole layer's reference and its
    # temporaries in float64 were the peak of a large decoder's --verify.
    d = layer.diff(x, y64, values, CONFIG_TOLERANCE)
    if d.ratio <= 1 and d.same_positions:
        return True, ""
    return False, f"layer {layer.node}: the original subgraph in float64 differs from the fused configuration by {d.max_abs:.3g}: the fusion changed what the layer computes"


# -- the export's own float32 noise ------------------------------------------------------------


def _noise_floor(before: _Model, sets: list[tuple[dict, dict]], indices: Sequence[int]) -> dict[str, float]:
    """Per model output, the largest difference between the original run as verification ran
    it (graph optimisations on) and run again with them off (no NCHWc Convs, no fusions: the
    same model summed in another float32 order), over the input sets ``indices``: how far two
    float32 evaluations of the export itself drift apart. One whole-model run per set, only
    the outputs fetched (less memory than the layer runs before it)."""
    floor: dict[str, float] = {}
    with before.session([], whole=True, optimized=False) as run:
        for i in indices:
            feeds, expected = sets[i]
            again = run(feeds)
            for name in before.outputs:
                d = _diff(again[name], expected[name], _tolerance(expected[name].dtype))
                floor[name] = max(floor.get(name, 0.0), d.max_abs)
            del again
            _trim()
    return floor


def _within_noise(before: _Model, sets: list[tuple[dict, dict]], missed: list[int], outputs: dict[str, OutputCheck],
                  notes: list[str], problems: list[str]) -> str | None:
    """:data:`WITHIN_NOISE` when every output out of tolerance differs from the original by at
    most :data:`NOISE_FACTOR` times the export's own float32 noise (:func:`_noise_floor`), else
    None (the reason in ``problems``). Called only when every layer passed (a)."""
    try:
        floor = _noise_floor(before, sets, missed)
    except Exception as e:  # the unoptimised session is a second opinion, never a new failure
        problems.append(f"the original run without graph optimisations failed, no noise floor to compare with: {one_line(e)}")
        return None
    bad = [c for c in outputs.values() if not c.passed]
    for c in outputs.values():
        c.noise_floor = floor.get(c.name)
    over = [c for c in bad if not c.max_abs_error <= NOISE_FACTOR * floor.get(c.name, 0.0)]
    described = ", ".join(f"{c.name!r} {c.max_abs_error:.3g} against {floor.get(c.name, 0.0):.3g}" for c in (over or bad))
    if over:
        problems.append(f"beyond {NOISE_FACTOR:g}x the export's own float32 noise (the original without graph optimisations): {described}")
        return None
    notes.append(f"the outputs differ beyond the tolerance by no more than {NOISE_FACTOR:g}x the export's own float32 noise "
                 f"(the original run without graph optimisations differs from itself by as much): {described}; every layer is within "
                 "the tolerance of its float64 reference")
    return WITHIN_NOISE


# -- verify -----------------------------------------------------------------------------------


def _run_sets(plan: inputs_module.Plan, run: Callable[[dict], dict], source: str, keep: Callable[[int, dict], dict]) -> list[tuple[dict, dict]]:
    """The input sets the original runs on: the first size that runs, then a larger one (and
    masks mixed); returns ``[(feeds, keep(index, results))]``."""
    sets, last = [], None
    for sizes in plan.growth():
        feeds = plan.feeds(sizes)
        try:
            results = run(feeds)
        except _Unsegmentable:
            raise
        except Exception as e:  # the model does not accept these sizes: grow
            logger.debug("original model rejected %s: %s", {k: v.shape for k, v in feeds.items()}, e)
            last = e
        else:
            sets.append((feeds, keep(0, results)))
            del results  # the layer values (often larger than the model outputs) are tallied
            first = sizes
            break
    else:
        name = plan.first_dynamic_input
        reason = f" ({one_line(last)})" if last is not None else ""
        raise UsageError(
            f"{source}: input {name!r}: the original model ran on none of the input sizes tried{reason}; "
            f"give sizes with {inputs_module.FLAG_SHAPE} or arrays with {inputs_module.FLAG_INPUTS}"
        )
    for sizes in plan.second(first):
        feeds = plan.feeds(sizes, index=1)
        try:
            results = run(feeds)
        except _Unsegmentable:
            raise
        except Exception as e:
            logger.debug("original model rejected the second size %s: %s", sizes, e)
        else:
            sets.append((feeds, keep(1, results)))
            del results
            break
    else:
        if plan.has_masks:
            feeds = plan.feeds(first, index=1)
            sets.append((feeds, keep(1, run(feeds))))
    return sets


def verify(
    original: onnx.ModelProto | ir.Model | str | os.PathLike,
    rewritten: onnx.ModelProto | ir.Model | str | os.PathLike,
    *,
    seed: int = 0,
    spec: inputs_module.InputSpec | None = None,
    source: str = "",
    workdir: str | os.PathLike | None = None,
) -> Verification:
    """Judge ``rewritten`` against ``original`` and the float64 reference (module docstring).

    A path is read with its external data in place. A model whose weights are in memory is
    written once, weights in external data, into a temporary folder in ``workdir`` (default:
    the system's temporary folder), removed before returning.

    Raises UsageError when no inputs can be made (naming the input and the flag to use) or
    onnxruntime is missing, ModelFileError when onnxruntime refuses the original model.
    """
    _onnxruntime()
    with contextlib.ExitStack() as stack:
        try:
            before = _Model(original, "original", source, stack, workdir)
        except _LoadError as e:
            raise ModelFileError(str(e)) from e
        try:
            after = _Model(rewritten, "fused", "", stack, workdir)
        except _LoadError as e:  # the fused model is ours: a bug, not bad input
            raise RuntimeError(str(e)) from e
        return _verify(before, after, inputs_module.Plan(before.ir, spec, seed=seed))


def _fetched(batch: list[_Layer], side: str) -> list[str]:
    if side == "fused":
        return [n for layer in batch for n in layer.fetched]
    return list(dict.fromkeys(n for layer in batch if layer.in_original for n in layer.original_fetched))


#: The suffix targets/ort_cpu.py gives the channels-first copy of a channels-last value when it
#: removes an export's Transposes: the original holds the value under the name without it.
_CHANNELS_FIRST_SUFFIX = CHANNELS_FIRST_SUFFIX


def _match_original(layer: _Layer, before: _Model) -> None:
    """Find the layer's values in the original: the same names, or X and Y channels last under
    the names a target's layout change came from; and the shapes its subgraph reads from outside."""

    def original(name: str) -> tuple[str, bool]:
        stem = name.removesuffix(_CHANNELS_FIRST_SUFFIX)
        return (stem, True) if name not in before.values and stem != name and stem in before.values else (name, False)

    (layer.original_x, layer.x_channels_last), (layer.original_y, layer.channels_last) = original(layer.x), original(layer.y)
    layer.in_original = all(n is None or n in layer.constants or n in before.values for n in (layer.original_x, layer.original_y, *layer.params))
    if layer.in_original:
        if not layer.x_channels_last and (moved := _channels_last_input(before.ir, layer.original_x, layer.original_y)):
            layer.original_x, layer.x_channels_last = moved, True
        layer.shapes = _outside_shapes(before.ir, layer.original_x, layer.original_y)


def _channels_last_input(model: ir.Model, x: str, y: str) -> str | None:
    """The output of the Transpose that moves ``x`` channels last (perm 0, 2, ..., 1), when the
    original's nodes from ``x`` to ``y`` read ``x`` through it alone (and through Shape/Size):
    the same numbers, in the layout the export normalises. tf2onnx writes one before each
    channels-last layer fed by a Conv; fetched as the layer input in its place, onnxruntime
    need not keep the Conv's channels-first output alive beside it for the rest of the run
    (the Keras SD3 VAE decoder's 256x256x256 layer at batch 2: 128 MiB). None otherwise."""
    nodes, whole = _walk_back(model, {x}, y, _MAX_SUBGRAPH_NODES + 1)
    if not whole:  # not a layer's subgraph: leave it as it is
        return None
    readers = {node for node in nodes if node.op_type not in _SHAPE_OPS and x in [v.name for v in node.inputs if v is not None]}
    if len(readers) != 1:
        return None
    (node,) = readers
    perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else None
    channels_last = perm is not None and len(perm) > 2 and list(perm) == [0, *range(2, len(perm)), 1]
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not channels_last or not node.outputs[0].name:
        return None
    return node.outputs[0].name


def _failed(shapes: list[dict], detail: str) -> Verification:
    return Verification(
        passed=False, max_abs_error=float("nan"), worst_ratio=float("inf"), rtol=_DEFAULT.rtol, atol=_DEFAULT.atol,
        inputs=shapes[0], detail=detail, verdict="FAILED", input_sets=shapes,
    )


def _verify(before: _Model, after: _Model, plan: inputs_module.Plan) -> Verification:
    layers = _layers(after.ir)
    for layer in layers:
        _match_original(layer, before)
    batches = _batches(layers, after.ir, plan)
    logger.debug("verification: %d layer(s) fetched in %d batch(es)", len(layers), len(batches))
    if len(batches) > 1:
        try:
            return _verify_in_parts(before, after, plan, layers, batches)
        except _Unsegmentable as e:
            logger.debug("verification: the models cannot be cut (%s); one run per batch", e)
    return _verify_in_batches(before, after, plan, layers, batches[::-1])


def _verify_in_parts(before: _Model, after: _Model, plan: inputs_module.Plan, layers: list[_Layer], batches: list[list[_Layer]]) -> Verification:
    """Each model cut after each batch's layers (:class:`_Segments`): one run of each model
    per input set, one batch of layer values held at a time."""
    tally = _Tally(layers, before.outputs)

    def runner(parts: _Segments, side: str) -> Callable[[dict], dict]:
        def run(feeds: dict) -> dict:
            measured: list = []
            outputs = parts.run(feeds, lambda k, values: measured.extend(tally.measure(side, values, batches[k])))
            tally.commit(side, measured)
            return {n: np.array(v, copy=True) for n, v in outputs.items()}
        return run

    parts = _Segments(before, [_fetched(b, "original") for b in batches])
    sets = _run_sets(plan, runner(parts, "original"), before.name, lambda index, outputs: outputs)
    shapes = [{k: list(v.shape) for k, v in feeds.items()} for feeds, _ in sets]
    parts = _Segments(after, [_fetched(b, "fused") for b in batches])
    run, fused = runner(parts, "fused"), []
    for i, (feeds, _) in enumerate(sets):
        try:
            fused.append(run(feeds))
        except _Unsegmentable:
            raise
        except Exception as e:
            return _failed(shapes, f"the fused model failed on input set {i + 1} that the original ran on: {one_line(e)}")
    return _judge(before, tally, sets, fused, shapes)


def _verify_in_batches(before: _Model, after: _Model, plan: inputs_module.Plan, layers: list[_Layer], batches: list[list[_Layer]]) -> Verification:
    """One session and run per batch and input set: the first batch's runs the whole model
    (its outputs, and the sizes it accepts), each later one only the nodes its layers need."""
    tally = _Tally(layers, before.outputs)
    fetched = _fetched
    try:
        with before.session(fetched(batches[0], "original")) as run:
            sets = _run_sets(plan, run, before.name, lambda index, results: tally.add("original", index, results, batches[0]))
        for batch in batches[1:]:
            if not fetched(batch, "original"):
                continue
            with before.session(fetched(batch, "original"), whole=False) as run:
                for i, (feeds, _) in enumerate(sets):
                    tally.add("original", i, run(feeds), batch)
                    _trim()
    except _LoadError as e:  # the same one-line classification as the CLI's loading
        raise (model_file_error(e.__cause__, before.name) or ModelFileError(str(e))) from e
    shapes = [{k: list(v.shape) for k, v in feeds.items()} for feeds, _ in sets]
    failed = lambda detail: _failed(shapes, detail)  # noqa: E731
    fused: list[dict] = []
    for b, batch in enumerate(batches):
        try:
            with after.session(fetched(batch, "fused"), whole=b == 0) as run:
                for i, (feeds, _) in enumerate(sets):
                    try:
                        outputs = tally.add("fused", i, run(feeds), batch)
                    except Exception as e:
                        return failed(f"the fused model failed on input set {i + 1} that the original ran on: {one_line(e)}")
                    if b == 0:
                        fused.append(outputs)
        except _LoadError as e:
            return failed(str(e))
    return _judge(before, tally, sets, fused, shapes)


#: Bytes of layer inputs and outputs fetched at once: onnxruntime keeps every graph output of
#: a run alive to its end (30 layers of a 256x256 VAE decoder: ~880 MiB). Above it the layers
#: are fetched in batches, each model cut into one part per batch (:class:`_Segments`; the
#: cost: a session per part). 128 MiB, one or two of that decoder's largest layers: its
#: peak RSS 761 MiB at 21 s, against 909 MiB at 22 s with 256 MiB (benchmarks/fuse_memory.py).
FETCH_BUDGET_BYTES = 128 * 2**20


def _batches(layers: list[_Layer], model: ir.Model, plan: inputs_module.Plan) -> list[list[_Layer]]:
    """Consecutive layers in batches whose fetched values fit :data:`FETCH_BUDGET_BYTES` at the
    first input size tried (a layer's X and Y: twice X's size, its dims traced from the model
    inputs, dynamic ones at the size the plan gives their name). A layer of unknown size
    counts as the largest known one; with no size known, one batch (as before)."""
    if not layers:
        return [[]]
    symbols = next(iter(plan.growth()), {})
    values = {v.name: v for v in model.graph.inputs}
    values.update((v.name, v) for node in model.graph for v in node.outputs if v.name)
    sizes = [_layer_bytes(values.get(layer.x), values.get(layer.y), symbols) for layer in layers]
    known = [b for b in sizes if b is not None]
    if not known:
        return [layers]
    batches, total = [[]], 0
    for layer, size in zip(layers, sizes):
        cost = max(known) if size is None else size
        if batches[-1] and total + cost > FETCH_BUDGET_BYTES:
            batches.append([])
            total = 0
        batches[-1].append(layer)
        total += cost
    return batches


def _layer_bytes(x: ir.Value | None, y: ir.Value | None, symbols: dict[str, int]) -> int | None:
    """Bytes of a layer's X and Y (same shape), or None when X's dims are not known."""
    if x is None:
        return None
    dims = _shapes.dims_of(x)
    if dims is None:
        return None
    count = 1
    for d in dims:
        n = _shapes.evaluate(d, symbols)
        if n is None or n < 0:
            return None
        count *= n
    dtype = next((v.dtype for v in (y, x) if v is not None and v.dtype is not None), ir.DataType.FLOAT)
    return math.ceil(2 * count * dtype.itemsize)


class _Stashed:
    """An array kept in an anonymous temporary file until it is needed: the original's input of
    each layer a "more accurate" verdict may rest on (up to one per layer, each as large as
    the layer) stays out of memory meanwhile."""

    def __init__(self, array: np.ndarray) -> None:
        self.file = tempfile.TemporaryFile()  # deleted when closed or collected
        np.save(self.file, np.ascontiguousarray(array), allow_pickle=False)

    def load(self) -> np.ndarray:
        self.file.seek(0)
        return np.load(self.file, allow_pickle=False)

    def close(self) -> None:
        self.file.close()


class _Tally:
    """Each layer's worst error against its reference, per side, accumulated run by run so that
    no run's layer values outlive it (only the model outputs are kept, and the original's layer
    input where it is out of tolerance: the float64 subgraph check needs it)."""

    def __init__(self, layers: list[_Layer], outputs: list[str]) -> None:
        self.layers = layers
        self.outputs = outputs
        self.checks = [LayerCheck(node=layer.node, input=layer.x, output=layer.y, fused_error=0.0, fused_ratio=0.0) for layer in layers]
        self.suspect_inputs: dict[str, tuple[_Stashed, dict]] = {}  # layer node -> (original X, params)
        self._why: dict[str, str] = {}  # layer node -> why its original subgraph was not confirmed

    def add(self, side: str, index: int, results: dict[str, np.ndarray], batch: Sequence[_Layer]) -> dict[str, np.ndarray]:
        """Tally the layers of ``batch`` (``results`` holds their values); returns the model outputs."""
        self.commit(side, self.measure(side, results, batch))
        # Copies: onnxruntime's arrays may keep the session's whole memory arena alive.
        return {name: np.array(results[name], copy=True) for name in self.outputs if name in results}

    def measure(self, side: str, results: dict[str, np.ndarray], batch: Sequence[_Layer]) -> list[tuple]:
        """The errors of the layers of ``batch`` in ``results``, to :meth:`commit` once the run
        they come from has finished (a run that fails part way tallies nothing)."""
        judged = {id(layer) for layer in batch}
        measured = []
        for layer, check in zip(self.layers, self.checks):
            if id(layer) not in judged or (side == "original" and not layer.in_original):
                continue
            raw = results[layer.x] if side == "fused" else results[layer.original_x or layer.x]
            x = raw if side == "fused" else layer.original_input(raw)
            y = results[layer.y] if side == "fused" else layer.original_output(results[layer.original_y])
            if y.shape != x.shape:  # not the same value after all: no original error for this layer
                logger.debug("layer %s: the original's %s is %s, the input %s", layer.node, layer.original_y, y.shape, x.shape)
                continue
            try:
                d = layer.diff(x, y, results)
            except ValueError as e:  # the original's value of that name is laid out differently
                logger.debug("layer %s: no %s reference: %s", layer.node, side, e)
                continue
            ratio = d.ratio if d.same_positions else float("inf")
            suspect = None
            if side == "original" and ratio > SUSPECT_RATIO and layer.node not in self.suspect_inputs:
                suspect = (_Stashed(raw), {n: results[n].copy() for n in (*layer.params, *layer.shapes) if n in results})
            measured.append((layer, check, d, ratio, suspect))
        return measured

    def commit(self, side: str, measured: list[tuple]) -> None:
        for layer, check, d, ratio, suspect in measured:
            error, worst = getattr(check, f"{side}_error") or 0.0, getattr(check, f"{side}_ratio") or 0.0
            setattr(check, f"{side}_error", max(error, d.max_abs))
            setattr(check, f"{side}_ratio", max(worst, ratio))
            if suspect is not None and layer.node not in self.suspect_inputs:
                self.suspect_inputs[layer.node] = suspect

    def confirm(self, before: _Model, layer: _Layer, check: LayerCheck) -> str:
        """:func:`_confirmed` on the original's stashed input of ``layer`` (once; the stash is
        closed after): records ``check.confirmed``, returns why not ("" when confirmed)."""
        if layer.node in self.suspect_inputs:
            stashed, params = self.suspect_inputs.pop(layer.node)
            check.confirmed, self._why[layer.node] = _confirmed(before.ir, layer, stashed.load, params)
            stashed.close()
        return self._why.get(layer.node, "")


def _judge(before: _Model, tally: _Tally, sets: list[tuple[dict, dict]], fused: list[dict], shapes: list[dict]) -> Verification:
    expected_sets = [expected for _, expected in sets]
    notes, problems = [], []
    positions_ok = True
    outputs: dict[str, OutputCheck] = {}
    missed: set[int] = set()  # the input sets on which an output misses the tolerance
    tolerance = _DEFAULT
    for i, (expected, actual) in enumerate(zip(expected_sets, fused)):
        for name in before.outputs:
            a, b = actual[name], expected[name]
            tolerance = _tolerance(b.dtype)
            d = _diff(a, b, tolerance)
            check = outputs.setdefault(name, OutputCheck(name=name, max_abs_error=0.0, worst_ratio=0.0, nonfinite=0, passed=True))
            check.max_abs_error = max(check.max_abs_error, d.max_abs)
            check.worst_ratio = max(check.worst_ratio, d.ratio)
            check.nonfinite = max(check.nonfinite, d.nonfinite)
            if not d.same_positions:
                check.passed = positions_ok = False
                problems.append(f"output {name!r} on input set {i + 1}: not finite in the original at {_positions(b)}, in the fused model at {_positions(a)}")
            elif d.nonfinite:
                notes.append(f"output {name!r} on input set {i + 1}: the original is not finite at {_positions(b)}; the fused model is not finite at the same positions (compared there as positions)")
            if d.ratio > 1:
                check.passed = False
                missed.add(i)
    outputs_ok = all(c.passed for c in outputs.values())

    layers, checks = tally.layers, tally.checks
    layers_ok = True
    for layer, check in zip(layers, checks):
        if check.fused_ratio <= 1:
            continue
        excused = check.original_error is not None and check.fused_error <= check.original_error
        # As far off as the export: excused by the export's own float32 arithmetic unless the
        # float64 re-run of its subgraph shows another configuration (a node that computes the
        # export's arithmetic under a wrong attribute is as far off as the export).
        why = tally.confirm(before, layer, check) if excused else ""
        if excused and check.confirmed is not False:
            if why:  # could not be evaluated: excused as before, and said
                notes.append(f"{why}: excused as the export is as far off ({check.original_error:.3g})")
            continue
        layers_ok = False
        problems.append(f"layer {check.node}: {check.fused_error:.3g} from its float64 reference ({check.fused_ratio:.3g} of the tolerance)"
                        + (f", the original's subgraph {check.original_error:.3g}" if check.original_error is not None else ""))
        if why:
            problems.append(why)

    verdict = "passed" if layers_ok and outputs_ok else "FAILED"
    if not outputs_ok:
        bad = [c for c in outputs.values() if c.worst_ratio > 1]
        if bad:
            problems.insert(0, "outputs differ beyond the tolerance: " + ", ".join(f"{c.name!r} by {c.max_abs_error:.3g} ({c.worst_ratio:.3g} of it)" for c in bad))
    if layers_ok and not outputs_ok and positions_ok:
        suspects = [(layer, c) for layer, c in zip(layers, checks)
                    if c.original_ratio is not None and c.original_ratio > SUSPECT_RATIO and c.original_error > SUSPECT_MARGIN * c.fused_error]
        reasons = [why for layer, check in suspects if (why := tally.confirm(before, layer, check))]
        if suspects and not reasons:
            verdict = MORE_ACCURATE
            worst = max(suspects, key=lambda s: s[1].original_error)[1]
            notes.append(f"the outputs differ beyond the tolerance because the export's own arithmetic is off: layer {worst.node} is "
                         f"{worst.original_error:.3g} from its float64 reference in the original, {worst.fused_error:.3g} in the fused model")
        problems.extend(reasons)
        if not suspects:
            verdict = _within_noise(before, sets, sorted(missed), outputs, notes, problems) or verdict

    return Verification(
        passed=verdict != "FAILED",
        max_abs_error=max((c.max_abs_error for c in outputs.values()), default=0.0),
        worst_ratio=max((c.worst_ratio for c in outputs.values()), default=0.0),
        rtol=tolerance.rtol,
        atol=tolerance.atol,
        inputs=shapes[0],
        detail="; ".join(problems) if verdict == "FAILED" else "",
        verdict=verdict,
        layers=checks,
        outputs=list(outputs.values()),
        notes=notes,
        input_sets=shapes,
    )
