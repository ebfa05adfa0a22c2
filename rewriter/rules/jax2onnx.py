"""Keras + JAX through jax2onnx (``model.export`` under ``KERAS_BACKEND=jax``).

Keras' JAX ``moments`` is ``mean = jnp.mean(x)``, ``var = jnp.var(x)``, and jnp.var
recomputes its own mean. jax2onnx writes every reduction with ``keepdims=0`` and broadcasts
it back with ``Reshape`` + ``Expand`` (a ``broadcast_in_dim``)::

    m    = ReduceMean(xs, axes)                            # used only for the -mean branch
    s    = Expand(Reshape(ReduceSum(xs, axes, keepdims=0), t1), t2)
    d    = Sub(xs, Div(s, N))                              # N: constant, or Cast(Shape products)
    ss   = Expand(Reshape(ReduceSumSquare(d, axes, keepdims=0), t3), t4)
    den  = Sub(N', Cast(ddof))                             # ddof = 0
    var  = Where(Greater(den, 0.0), Div(ss, den), NaN | Expand(NaN, t5))
    inv  = Div(1.0, Sqrt(Add(var, eps)))

``xs`` is the grouped tensor (``Cast(FLOAT)`` of it for float16 inputs); gamma/beta are
``Reshape([C], [1,..,G,C/G])`` (behind ``Cast(FLOAT)`` under the float16 policy), handled by
the shared Keras skeleton.

What ``check`` proves on top of the skeleton:

* the sum reductions reduce exactly "all but batch and group" (any ``keepdims``), and the
  ``Reshape``/``Expand`` pairs restore exactly the ``keepdims=1`` shape ``[B,1,..,G,..,1]``,
  so ``s`` and ``ss`` equal the ``keepdims=1`` reductions;
* ``N`` and ``N'`` are scalars equal to the number of elements per (sample, group), evaluated
  symbolically (a product of ``Shape`` slices for dynamic spatial dims), so ``Div(s, N)`` is
  the mean and ``Div(ss, N - 0)`` the population variance;
* ``ddof`` is 0 and the ``Greater`` compares with 0, so the ``Where`` picks ``Div(ss, den)``
  whenever ``N > 0``. ``N`` is a product of dims of ``xs``; ``N = 0`` means ``xs`` (and the
  output) is empty, so the NaN fallback never reaches an output element and dropping it is
  exact. The fallback's shape must broadcast into ``[B,1,..,G,..,1]`` (it could otherwise
  grow the result).

Exactness notes: ``N`` is used as float32 as jnp.var does; for ``N >= 2**24`` the original
rounds it (relative error < 2**-24, below float32 rounding of the sums). A run-time ``N`` goes
through ``Cast(INT32)``, which would wrap for ``N >= 2**31`` elements per group in the
original graph; the fused op computes the intended statistics.

jax2onnx also reads ``Shape`` of intermediates of the subgraph (the reductions, the variance,
the grouped tensor, the result) to build those broadcast targets. The default matcher
refuses such a match ("other uses"); this family's matcher instead claims every node that
computes only from such ``Shape`` reads and feeds only the subgraph (it dies with it), and
``check`` rejects any other use of an intermediate with a reason.
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern

from .. import _match, _shapes
from ._keras import KerasGroupNormFusionBase, optional_cast

__all__ = ["KerasJaxGroupNormFusion", "rules"]

#: Ops that may compute from a ``Shape`` read of an intermediate and die with the subgraph.
_SHAPE_OPS = frozenset(
    {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity"}
    | {"Mul", "Add", "Sub", "Div", "Expand", "ConstantOfShape"}
)
#: At most this many such nodes per match (jax2onnx needs about 20 for a rank-5 dynamic input).
_MAX_SHAPE_NODES = 128
_INT_TYPES = frozenset({ir.DataType.INT32, ir.DataType.INT64})


# -- helpers (candidates for _match/_shapes) ---------------------------------------------


#: Matched nodes that may stay in the graph when a shape computation outside the subgraph
#: reads their output: they copy no data (the grouping Reshape of ``x``).
_KEEPABLE = frozenset({"Reshape", "Identity", "Squeeze", "Unsqueeze"})


@dataclasses.dataclass
class _ShapeReads:
    """What :func:`_shape_closure` found: nodes to remove with the match, matched nodes to keep."""

    claimed: list = dataclasses.field(default_factory=list)
    kept: set = dataclasses.field(default_factory=set)
    reason: str | None = None


def _shape_closure(nodes, y: ir.Value) -> _ShapeReads:
    """Shape computations outside ``nodes`` that read a matched intermediate.

    Every outside consumer of an intermediate (a matched node's output other than ``y``)
    must be a ``Shape``; the shape ops computed from those reads (forward, stopping at
    matched nodes) that end in matched nodes only die with the match (``claimed``). jax2onnx
    shares such computations between layers of equal shape: one that is also read elsewhere
    (another layer's ``Greater``, a graph output) stays for those readers, and so do the
    matched nodes it reads (``kept``), which must copy no data: the other readers then see
    the same values as before, and the fused op does not need them.
    """
    matched = set(nodes)
    shape_reads: list[ir.Node] = []
    for node in nodes:
        for value in node.outputs:
            if value is y:
                continue
            if value.is_graph_output():
                return _ShapeReads(reason=f"intermediate {value.name!r} is a graph output")
            for consumer, _ in value.uses():
                if consumer in matched or consumer in shape_reads:
                    continue
                if consumer.op_type != "Shape" or consumer.domain not in ("", "ai.onnx"):
                    return _ShapeReads(reason=f"intermediate {value.name!r} is used outside the subgraph by {consumer.op_type} {consumer.name!r}")
                shape_reads.append(consumer)
    closure: list[ir.Node] = []
    seen: set[ir.Node] = set(shape_reads)
    frontier = list(shape_reads)
    escaping: set[ir.Node] = set()
    outside_reader = None
    while frontier:
        node = frontier.pop()
        closure.append(node)
        if len(closure) > _MAX_SHAPE_NODES:
            return _ShapeReads(reason="too many shape computations read intermediates of the subgraph")
        for value in node.outputs:
            if value.is_graph_output():
                escaping.add(node)
                outside_reader = outside_reader or f"{node.op_type} {node.name!r} reads an intermediate and is a graph output"
            for consumer, _ in value.uses():
                if consumer in matched or consumer in seen:
                    continue
                if consumer.op_type not in _SHAPE_OPS or consumer.domain not in ("", "ai.onnx"):
                    escaping.add(node)
                    outside_reader = outside_reader or (
                        f"{consumer.op_type} {consumer.name!r} computes from the shape of an intermediate "
                        "and is used outside the subgraph"
                    )
                    continue
                seen.add(consumer)
                frontier.append(consumer)
    # A node escapes when any of its readers does (the closure is a DAG: iterate to a fixpoint).
    changed = bool(escaping)
    while changed:
        changed = False
        for node in closure:
            if node not in escaping and any(c in escaping for v in node.outputs for c, _ in v.uses()):
                escaping.add(node)
                changed = True
    kept: set[ir.Node] = set()
    stack = [read.inputs[0].producer() for read in shape_reads if read in escaping]
    while stack:
        node = stack.pop()
        if node is None or node not in matched or node in kept:
            continue
        if node.op_type not in _KEEPABLE or node.domain not in ("", "ai.onnx"):
            return _ShapeReads(reason=outside_reader)
        kept.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return _ShapeReads(claimed=[n for n in closure if n not in escaping], kept=kept)


class _ShapeReadsClaimingMatcher(pattern.SimplePatternMatcher):
    """The simple matcher, plus the ``Shape``-only computations that die with the match.

    It matches without the default "no other uses" test and adds the claimed nodes of
    :func:`_shape_closure` to the match, so the rewrite removes them with the subgraph, and
    takes the kept ones out of it. When an intermediate has another use it changes nothing:
    the rule's ``check`` then fails with the reason.
    """

    def match(self, model, graph_or_function, node, *, verbose=0, remove_nodes=True, tracer=None):
        result = super().match(model, graph_or_function, node, verbose=verbose, remove_nodes=False, tracer=tracer)
        if result and remove_nodes:
            reads = _shape_closure(result.nodes, result.outputs[0] if result.outputs else None)
            if reads.reason is None:
                for extra_node in reads.claimed:
                    result.add_node(extra_node)
                if reads.kept:
                    # onnxscript has no public way to unmatch a node: edit the match's own list
                    matched = result._current_match._matched_nodes
                    matched[:] = [n for n in matched if n not in reads.kept]
        return result


def _keepdims(node: ir.Node) -> bool:
    attr = node.attributes.get("keepdims")
    return attr is None or attr.as_int() != 0


def _factors(dim, alias: dict) -> tuple[int, collections.Counter] | None:
    """A product of dims as (integer coefficient, multiset of symbolic factors)."""
    dim = alias.get(dim, dim) if not isinstance(dim, int) else dim
    if isinstance(dim, int):
        return dim, collections.Counter()
    if getattr(dim, "op", None) == "Mul":
        coef, syms = 1, collections.Counter()
        for arg in dim.args:
            part = _factors(arg, alias)
            if part is None:
                return None
            coef *= part[0]
            syms += part[1]
        return coef, syms
    # a symbol, or an expression we do not factor (a Conv's output size): one factor
    return 1, collections.Counter([dim])


def _scalar_shape(value: ir.Value, rank: int) -> bool:
    """Whether ``value`` has at most ``rank`` dims, all 1 (it broadcasts as a scalar)."""
    dims = _shapes.dims_of(value)
    return dims is not None and len(dims) <= rank and all(d == 1 for d in dims)


class KerasJaxGroupNormFusion(KerasGroupNormFusionBase):
    """Keras' JAX moments (``jnp.mean`` and ``jnp.var`` with ddof=0) as jax2onnx writes them."""

    @classmethod
    def rule(cls, *args, **kwargs) -> pattern.RewriteRule:
        instance = cls(*args, **kwargs)
        return pattern.RewriteRule(
            instance.pattern,
            instance.rewrite,
            instance.check,
            matcher=_ShapeReadsClaimingMatcher,
            name=instance.name,
            remove_nodes=instance.remove_nodes,
            graph_pre_visitor=instance.setup,
            graph_post_visitor=instance.cleanup,
            as_function=instance.as_function,
        )

    # -- pattern ---------------------------------------------------------------------
    @staticmethod
    def _broadcast_back(op, reduced, name: str):
        """``Expand(Reshape(reduced, t1), t2)``: a keepdims=0 reduction broadcast back."""
        kept = op.Reshape(reduced, pattern.Var(f"{name}_shape"), _outputs=[f"{name}_kept"])
        return op.Expand(kept, pattern.Var(f"{name}_target"), _outputs=[f"{name}_bcast"])

    def moments(self, op, xs):
        mean = op.ReduceMean(xs, _allow_other_inputs=True)
        total = self._broadcast_back(op, op.ReduceSum(xs, _allow_other_inputs=True, _outputs=["sum"]), "sum")
        deviation = op.Sub(xs, op.Div(total, pattern.Var("count")))
        squares = self._broadcast_back(op, op.ReduceSumSquare(deviation, _allow_other_inputs=True, _outputs=["sumsq"]), "sumsq")
        den = op.Sub(pattern.Var("den_count"), optional_cast(op, pattern.Var("ddof"), "ddof_cast"))
        ratio = op.Div(squares, den, _outputs=["ratio"])
        variance = op.Where(op.Greater(den, pattern.Var("zero")), ratio, pattern.Var("fallback"))
        return mean, variance

    # -- check -----------------------------------------------------------------------
    def requires_keepdims(self, node: ir.Node) -> bool:
        # The sums may drop their dims: check_moments proves the Reshape/Expand back.
        return node.op_type not in ("ReduceSum", "ReduceSumSquare")

    def check(self, context, **bindings):
        result = super().check(context, **bindings)
        if not result:
            return result
        reads = _shape_closure(context.nodes, bindings["y"])
        if reads.reason:
            return pattern.MatchResult().fail(reads.reason)
        if reads.kept:  # the matcher takes them out of the match; never remove what others read
            names = sorted(n.name or n.op_type for n in reads.kept)
            return pattern.MatchResult().fail(f"{names} would be removed while a shape computation outside reads them")
        matched = set(context.nodes)
        if bindings["xg"].producer() not in matched:
            # the grouping Reshape stays for an outside shape read: our node takes another name
            self._fusion.name = bindings["y"].producer().name or f"{self._fusion.name}_group_norm"
        for name in ("gamma", "beta"):
            param = getattr(self._fusion, name)
            if isinstance(param, ir.Value) and param.producer() in matched:
                return pattern.MatchResult().fail(f"{name} is computed inside the subgraph", param)
        return result

    def check_moments(self, context, grouping: _match.Grouping, **b) -> str | None:
        xs = b["sum"].producer().inputs[0]
        rank = grouping.rank + 1  # of the grouped tensor
        groups, gaxis = grouping.groups, grouping.axis
        expected = _match.grouped_dims(list(grouping.x_dims), gaxis, groups)
        xs_dims = _shapes.dims_of(xs)
        if xs_dims is None or len(xs_dims) != rank:
            return f"the rank of the grouped tensor {xs.name!r} is unknown"
        if xs.dtype not in _match.FLOAT_TYPES:
            return f"the statistics are computed in {xs.dtype}, not a float type"
        # groupings() proved that the grouped tensor has the grouped dims of x; shape inference
        # may name them differently: map both names of a dim to one (its value when known).
        alias = {}
        for d, e in zip(xs_dims, expected):
            canonical = d if isinstance(d, int) else e
            for name in (d, e):
                if not isinstance(name, int):
                    alias[name] = canonical
        batch = {expected[0], xs_dims[0]}
        for name in ("sum", "sumsq", "sum_kept", "sumsq_kept", "sum_bcast", "sumsq_bcast", "ratio"):
            dims = _shapes.dims_of(b[name])
            if dims:
                batch.add(dims[0])

        def kept_dim(i: int):
            return groups if i == gaxis else 1

        def is_kept(dims, *, right_aligned: bool) -> bool:
            """Each dim equals (or broadcasts into, when ``right_aligned``) [B,1,..,G,..,1]."""
            if len(dims) > rank or (not right_aligned and len(dims) != rank):
                return False
            offset = rank - len(dims)
            for j, d in enumerate(dims):
                i = j + offset
                want_batch = i == 0
                if right_aligned and d == 1:
                    continue
                if want_batch and (d in batch or d is _shapes.INFER):
                    continue
                if not want_batch and (d == kept_dim(i) or d is _shapes.INFER):
                    continue
                return False
            return True

        for name in ("sum", "sumsq"):
            node = b[name].producer()
            if _keepdims(node):
                reduced_dims = [xs_dims[0] if i == 0 else kept_dim(i) for i in range(rank)]
            else:
                reduced_dims = [xs_dims[0], groups]
            reshape = b[f"{name}_kept"].producer()
            target = _shapes.int_values(b[f"{name}_shape"])
            if target is None:
                return f"the Reshape target of {node.op_type} {node.name!r} cannot be evaluated"
            allowzero = reshape.attributes.get("allowzero")
            out = _shapes.reshape_dims(reduced_dims, target, bool(allowzero.as_int()) if allowzero else False)
            if out is None or not is_kept(out, right_aligned=False):
                return f"{node.op_type} {node.name!r} is reshaped to {target}, not back to the keepdims shape"
            expand = _shapes.int_values(b[f"{name}_target"])
            if expand is None or not is_kept(expand, right_aligned=True):
                return f"{node.op_type} {node.name!r} is expanded to {expand}, not to the keepdims shape"

        count = _product([expected[i] for i in grouping.stat_axes], alias)
        if count is None:
            return "the number of elements per group cannot be evaluated"
        for name in ("count", "den_count"):
            why = _check_count(b[name], count, alias, rank)
            if why:
                return why
        ddof = _match.scalar_float(b["ddof"])
        if ddof is None or ddof != 0 or not _scalar_shape(b["ddof"], rank):
            return "the variance's ddof is not the scalar constant 0"
        cast = b.get("ddof_cast")
        if cast is not None and _match.cast_target(cast) not in _match.FLOAT_TYPES:
            return f"ddof is cast to {_match.cast_target(cast)}, not a float type"
        zero = _match.scalar_float(b["zero"])
        if zero is None or zero != 0 or not _scalar_shape(b["zero"], rank):
            return "the variance guard does not compare the count with the scalar 0"
        return _check_fallback(b["fallback"], is_kept)


def _product(dims, alias) -> tuple[int, collections.Counter] | None:
    coef, syms = 1, collections.Counter()
    for d in dims:
        part = _factors(d, alias)
        if part is None:
            return None
        coef *= part[0]
        syms += part[1]
    return coef, syms


def _check_count(value: ir.Value, want, alias, rank: int) -> str | None:
    """``value`` is a float scalar equal to ``want`` (a product from :func:`_product`):
    a constant, or a Cast to float of an integer shape computation."""
    if not _scalar_shape(value, rank):
        return f"the count {value.name!r} is not a scalar"
    if value.dtype not in _match.FLOAT_TYPES:
        return f"the count {value.name!r} is not a float"
    const = _match.scalar_float(value)
    if const is not None:
        if want[1]:
            return f"the count {const:g} is a constant but the group size is not static"
        if const != want[0]:
            return f"the count {const:g} is not the number of elements per group {want[0]}"
        return None
    cast = value.producer()
    if cast is None or cast.op_type != "Cast" or cast.inputs[0].dtype not in _INT_TYPES:
        return f"the count {value.name!r} is neither a constant nor a Cast of an integer shape computation"
    dims = _shapes.int_values(cast.inputs[0])
    if dims is None or len(dims) != 1:
        return f"the count {value.name!r} cannot be evaluated"
    if _factors(dims[0], alias) != want:
        return f"the count {dims[0]} is not the number of elements per group"
    return None


def _check_fallback(fallback: ir.Value, is_kept) -> str | None:
    """The Where's else-branch must not grow the variance's shape [B,1,..,G,..,1]; its value
    is never selected (see the module docstring)."""
    array = _shapes.numpy_of(fallback)
    if array is not None:
        if not is_kept(list(array.shape), right_aligned=True):
            return f"the variance fallback has shape {list(array.shape)}, which does not broadcast into the keepdims shape"
        return None
    node = fallback.producer()
    if node is not None and node.op_type == "Expand" and node.domain in ("", "ai.onnx"):
        source = _shapes.dims_of(node.inputs[0])
        target = _shapes.int_values(node.inputs[1])
        if source is not None and target is not None and is_kept(source, right_aligned=True) and is_kept(target, right_aligned=True):
            return None
    dims = _shapes.dims_of(fallback)
    if dims is not None and is_kept(dims, right_aligned=True):
        return None
    return "the variance fallback's shape cannot be shown to broadcast into the keepdims shape"


def rules() -> list[pattern.RewriteRule]:
    return [KerasJaxGroupNormFusion.rule(scale=s, center=c) for s in (True, False) for c in (True, False)]
