"""The FP32 islands of an FP16 model: which nodes stay FP32, and casts only where an island meets FP16 code.

Seeds are the numerically sensitive ops (LayerNorm fused or decomposed, softmax, reductions). An island
also takes the cheap element-wise or data-movement nodes that lie between two of its nodes (the `x - mean`
and `/ sqrt(var + eps)` of a decomposed LayerNorm), and any such node that would otherwise need more casts
than it saves. onnxconverter-common then casts each blocked node's inputs and outputs; `merge_casts` removes
what that leaves between neighbours (a cast per consumer, round trips through FP16) so that each tensor
crossing an island border is cast once.
"""

from __future__ import annotations

from collections import deque

import onnx

# LayerNorm (fused, or SAM's LayerNorm2d as mean/pow/sqrt), softmax and reductions (the density head's sum)
SENSITIVE_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt")
# element-wise and data-movement ops an island may take; never MatMul, Gemm, Conv: those are what FP16 is for
GROWABLE_OPS = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Reciprocal",
        "Abs",
        "Sqrt",
        "Pow",
        "Exp",
        "Log",
        "Erf",
        "Tanh",
        "Sigmoid",
        "Relu",
        "Max",
        "Min",
        "Clip",
        "Where",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Expand",
        "Identity",
        "Concat",
        "Slice",
        "Split",
    }
)
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
_FLOATS = (FLOAT, FLOAT16)


def value_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every typed value of a graph (inputs, outputs, value_info, initializers)."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


class _Graph:
    """Producer/consumer indices of a graph's float tensors."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        types = value_types(graph)
        self.nodes = list(graph.node)
        self.outputs = {o.name for o in graph.output}
        self.producer = {t: i for i, n in enumerate(self.nodes) for t in n.output if types.get(t) == FLOAT}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for t in node.input:
                if t in self.producer:
                    self.consumers.setdefault(t, []).append(i)

    def float_inputs(self, i: int) -> list[str]:
        """Computed float tensors node `i` reads."""
        return [t for t in dict.fromkeys(self.nodes[i].input) if t in self.producer]

    def float_outputs(self, i: int) -> list[str]:
        """Float tensors node `i` writes."""
        return [t for t in self.nodes[i].output if t in self.producer]

    def growable(self, i: int) -> bool:
        """Whether node `i` is a cheap op whose outputs are all float."""
        node = self.nodes[i]
        return node.op_type in GROWABLE_OPS and len(self.float_outputs(i)) == len(node.output)

    def reach(self, start: set[int], forward: bool) -> set[int]:
        """Growable nodes reachable from `start` through growable nodes only (down- or upstream)."""
        seen: set[int] = set()
        queue = deque(start)
        while queue:
            i = queue.popleft()
            tensors = self.float_outputs(i) if forward else self.float_inputs(i)
            nxt = (
                [c for t in tensors for c in self.consumers.get(t, ())]
                if forward
                else [self.producer[t] for t in tensors]
            )
            for j in nxt:
                if j not in seen and j not in start and self.growable(j):
                    seen.add(j)
                    queue.append(j)
        return seen

    def casts_saved(self, i: int, island: set[int]) -> int:
        """Border casts avoided by running node `i` in FP32 rather than FP16 (negative: more casts)."""
        inputs = [self.producer[t] in island for t in self.float_inputs(i)]
        outputs = [
            [c in island for c in self.consumers.get(t, ())] + ([False] if t in self.outputs else [])
            for t in self.float_outputs(i)
        ]
        as_fp16 = sum(inputs) + sum(any(users) for users in outputs)
        as_fp32 = len(inputs) - sum(inputs) + sum(not all(users) for users in outputs)
        return as_fp16 - as_fp32


def fp32_islands(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes of an FP32 graph (shape-inferred, named nodes) that its FP16 copy keeps in FP32."""
    g = _Graph(graph)
    seeds = {i for i, n in enumerate(g.nodes) if n.op_type in SENSITIVE_OPS and g.float_outputs(i)}
    island = seeds | (g.reach(seeds, forward=True) & g.reach(seeds, forward=False))
    changed = True
    while changed:
        joining = {i for i in range(len(g.nodes)) if i not in island and g.growable(i) and g.casts_saved(i, island) > 0}
        island |= joining
        changed = bool(joining)
    return {g.nodes[i].name for i in island}


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every node that reads `old` read `new`."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def _cast_to(node: onnx.NodeProto) -> int:
    """The `to` type of a Cast node."""
    return next(a.i for a in node.attribute if a.name == "to")


def float_outputs_kept(graph: onnx.GraphProto, names: set[str]) -> None:
    """Graph outputs `names` that an island writes: drop the converter's FP16 cast so they stay float32."""
    producer = {t: n for n in graph.node for t in n.output}
    for output in graph.output:
        cast = producer.get(output.name)
        if (
            output.name not in names
            or output.type.tensor_type.elem_type != FLOAT16
            or cast is None
            or cast.op_type != "Cast"
            or value_types(graph).get(cast.input[0]) != FLOAT
        ):
            continue
        inner = cast.input[0]
        producer[inner].output[list(producer[inner].output).index(inner)] = output.name
        _rename_input(graph, inner, output.name)
        graph.node.remove(cast)
        output.type.tensor_type.elem_type = FLOAT


def merge_casts(graph: onnx.GraphProto) -> None:
    """Drop FP32->FP16->FP32 round trips and duplicate casts of one tensor, then casts nobody reads."""
    outputs = {o.name for o in graph.output}
    while True:
        types = value_types(graph)
        producer = {t: n for n in graph.node for t in n.output}
        seen: dict[tuple[str, int], str] = {}
        redirect: dict[str, str] = {}
        for node in graph.node:
            if node.op_type != "Cast" or node.output[0] in outputs:
                continue
            source, to = node.input[0], _cast_to(node)
            inner = producer.get(source)
            if (
                to in _FLOATS
                and inner is not None
                and inner.op_type == "Cast"
                and _cast_to(inner) in _FLOATS
                and types.get(inner.input[0]) == to
            ):
                redirect[node.output[0]] = inner.input[0]  # cast back to the type the value started in
            elif (source, to) in seen:
                redirect[node.output[0]] = seen[(source, to)]
            else:
                seen[(source, to)] = node.output[0]
        for old, new in redirect.items():
            _rename_input(graph, old, new)
        read = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in read]
        for node in dead:
            graph.node.remove(node)
        if not redirect and not dead:
            break
    live = {t for n in graph.node for t in n.output} | {t.name for t in graph.input}
    kept = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(kept)
