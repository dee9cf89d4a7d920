"""Pre-optimisation: `torch.export` a model and lift its ATen graph back to FX with real modules.

Why: torch's FX graph-mode quantization (`prepare_fx`/`convert_fx`, the path that produces real
int8 kernels in eager CPU execution, see README.md) matches *modules* (`nn.Linear`, `nn.Conv2d`,
`nn.BatchNorm2d`, `nn.ReLU`) and needs a symbolically traceable model. Many real models (Hugging
Face transformers among them) are not traceable by `torch.fx.symbolic_trace`, while `torch.export`
captures them fine; and a `.pt2` file holds only an ATen graph. So every model goes through one
path: export (batch dimension dynamic) -> rewrite `aten.linear/conv*/batch_norm/relu` nodes whose
weights are attributes into `call_module` nodes of real modules named after the owning module's
fully qualified name -> a `torch.fx.GraphModule` that FX quantization understands. Every other
ATen op stays as it is and runs in fp32.

Op names are therefore the original module names (`encoder.layer.0.attention.self.query`), the
same for an `nn.Module` entrypoint and for its exported `.pt2`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

logger = logging.getLogger(__name__)

aten = torch.ops.aten

LINEAR_OPS = {aten.linear.default: "Linear"}
CONV_OPS = {aten.conv1d.default: "Conv1d", aten.conv2d.default: "Conv2d", aten.conv3d.default: "Conv3d"}
WEIGHTED_OPS = {**LINEAR_OPS, **CONV_OPS}
RELU_OPS = {aten.relu.default, aten.relu_.default}
# ATen ops with the same positional signature as a torch function that FX quantization knows how
# to run on quantized tensors (so int8 flows through them instead of a dequantize/quantize pair).
FUNCTION_ALIASES: dict[Any, Any] = {
    aten.flatten.using_ints: torch.flatten,
    aten.adaptive_avg_pool2d.default: torch.nn.functional.adaptive_avg_pool2d,
}

QUANTIZABLE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
_CONV_CLASSES: dict[str, type[nn.Module]] = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
_BN_CLASSES: dict[int, type[nn.Module]] = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@dataclass(frozen=True)
class OpInfo:
    """One quantizable op of the lifted graph."""

    name: str  # fully qualified module name, also the call_module target
    op_type: str  # Linear | Conv1d | Conv2d | Conv3d
    weight_shape: tuple[int, ...]


@dataclass
class LiftedGraph:
    module: fx.GraphModule
    ops: list[OpInfo]
    not_lifted: dict[str, str]  # op name -> why it stays fp32 (e.g. shared weight)


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


def _attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _conv_module(op_type: str, weight: torch.Tensor, bias: torch.Tensor | None, args: tuple[Any, ...]) -> nn.Module:
    dims = int(op_type[-2])
    rest = list(args[3:]) + [None] * 4
    stride = rest[0] if rest[0] is not None else 1
    padding = rest[1] if rest[1] is not None else 0
    dilation = rest[2] if rest[2] is not None else 1
    groups = rest[3] if rest[3] is not None else 1
    if isinstance(padding, str):
        raise ValueError("string padding")
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    conv = _CONV_CLASSES[op_type](
        in_per_group * groups, out_channels, tuple(weight.shape[2:]), stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=bias is not None,
    )
    assert len(conv.weight.shape) == dims + 2
    conv.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        conv.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return conv


def _linear_module(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return linear


def _bn_module(node: fx.Node, tensors: list[torch.Tensor | None], momentum: float, eps: float) -> nn.Module | None:
    weight, bias, mean, var = tensors
    value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if value is None or value.dim() not in _BN_CLASSES or mean is None or var is None:
        return None
    bn = _BN_CLASSES[value.dim()](mean.shape[0], eps=eps, momentum=momentum, affine=weight is not None)
    with torch.no_grad():
        if weight is not None and bias is not None:
            bn.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            bn.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return bn.eval()


def _getattr_target(node: Any) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _op_owner(node: fx.Node) -> str | None:
    """Owner module of the parameters a liftable op reads (linear/conv weight, batch-norm mean)."""
    if node.op != "call_function":
        return None
    if node.target in WEIGHTED_OPS and len(node.args) > 1:
        target = _getattr_target(node.args[1])
    elif node.target == aten.batch_norm.default and len(node.args) > 3:
        target = _getattr_target(node.args[3])
    else:
        return None
    return _owner(target) if target else None


def _used_elsewhere(attrs: list[Any], owner: str) -> bool:
    """True when a parameter of this op is also read by a node that is not an op of the same owner
    (a tied weight, e.g. an embedding matrix reused as output projection): such an op stays fp32."""
    return any(_op_owner(user) != owner for attr in attrs if isinstance(attr, fx.Node) for user in attr.users)


@dataclass
class _LiftPlan:
    """Which nodes of the exported graph become modules (step 1 of `lift`)."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    replaced: dict[fx.Node, tuple[str, list[fx.Node]]] = field(default_factory=dict)  # node -> (target, data inputs)
    not_lifted: dict[str, str] = field(default_factory=dict)
    ops: list[OpInfo] = field(default_factory=list)
    seen_ops: set[str] = field(default_factory=set)


def _plan_weighted(plan: _LiftPlan, source: nn.Module, node: fx.Node) -> None:
    """A linear/conv node whose weight (and bias) are parameters becomes a Linear/Conv module."""
    op_type = WEIGHTED_OPS[node.target]
    weight_target = _getattr_target(node.args[1])
    bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias_target = _getattr_target(bias_arg)
    if weight_target is None or (bias_arg is not None and bias_target is None):
        plan.not_lifted[node.name] = f"{op_type} whose weight is computed, not a parameter: kept fp32"
        return
    name = _owner(weight_target) or node.name
    if _used_elsewhere([node.args[1], bias_arg], _owner(weight_target)):
        plan.not_lifted[name] = f"weight of {name} is shared with other ops: kept fp32"
        return
    if name not in plan.modules:
        weight = _attr(source, weight_target)
        bias = _attr(source, bias_target) if bias_target else None
        try:
            module = (_linear_module(weight, bias) if op_type == "Linear"
                      else _conv_module(op_type, weight, bias, tuple(node.args)))
        except (ValueError, AssertionError) as exc:
            plan.not_lifted[name] = f"{op_type} with unsupported arguments ({exc}): kept fp32"
            return
        plan.modules[name] = module
    plan.replaced[node] = (name, [node.args[0]])
    if name not in plan.seen_ops:
        plan.seen_ops.add(name)
        plan.ops.append(OpInfo(name, op_type, tuple(_attr(source, weight_target).shape)))


def _plan_batch_norm(plan: _LiftPlan, source: nn.Module, node: fx.Node) -> None:
    """An inference-mode batch norm over parameter statistics becomes a BatchNorm module."""
    if node.args[5]:
        return  # training-mode batch norm
    targets = [_getattr_target(arg) for arg in node.args[1:5]]
    if targets[2] is None or targets[3] is None:
        return
    name = _owner(targets[2]) or node.name
    if name in plan.modules or _used_elsewhere(list(node.args[1:5]), _owner(targets[2])):
        return
    tensors = [_attr(source, t) if t else None for t in targets]
    module = _bn_module(node, tensors, float(node.args[6]), float(node.args[7]))
    if module is None:
        return
    plan.modules[name] = module
    plan.replaced[node] = (name, [node.args[0]])


def _plan_lift(source: nn.Module) -> _LiftPlan:
    """Step 1: decide which nodes become modules."""
    plan = _LiftPlan()
    for node in source.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in WEIGHTED_OPS:
            _plan_weighted(plan, source, node)
        elif node.target == aten.batch_norm.default:  # (the no-training variant returns a tuple: left alone)
            _plan_batch_norm(plan, source, node)
        elif node.target in RELU_OPS:
            name = f"_qtune_relu.{node.name}"
            plan.modules[name] = nn.ReLU()
            plan.replaced[node] = (name, [node.args[0]])
    return plan


def _copy_node(new_graph: fx.Graph, env: dict[fx.Node, fx.Node], attrs: dict[str, Any],
               source: nn.Module, plan: _LiftPlan, node: fx.Node) -> None:
    """Copy one non-placeholder node into the new graph, as a module call where the plan says so."""
    if node.op == "get_attr":
        if all(user in plan.replaced for user in node.users):
            return
        attrs[node.target] = _attr(source, node.target)
        env[node] = new_graph.get_attr(node.target)
        env[node].meta = dict(node.meta)
    elif node.op == "call_module" and node.target == "_guards_fn":
        return
    elif node in plan.replaced:
        target, data = plan.replaced[node]
        env[node] = new_graph.call_module(target, tuple(env[d] for d in data))
        env[node].meta = dict(node.meta)
    elif node.op == "output":
        outputs = node.args[0]
        flat = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
        mapped = [env[o] if isinstance(o, fx.Node) else o for o in flat]
        new_graph.output(mapped[0] if len(mapped) == 1 else tuple(mapped))
    elif node.op == "call_function" and node.target in FUNCTION_ALIASES and not node.kwargs:
        args = fx.map_arg(node.args, lambda n: env[n])
        env[node] = new_graph.call_function(FUNCTION_ALIASES[node.target], args)
        env[node].meta = dict(node.meta)
    else:
        env[node] = new_graph.node_copy(node, lambda n: env[n])


def _rebuild(source: nn.Module, plan: _LiftPlan, input_names: list[str]) -> fx.GraphModule:
    """Step 2: rebuild the graph with the planned modules, inputs named after `input_names`."""
    graph = source.graph
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, Any] = dict(plan.modules)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(input_names):
        raise ValueError(f"exported program has {len(placeholders)} inputs, expected {len(input_names)}")
    for node, name in zip(placeholders, input_names, strict=True):
        env[node] = new_graph.placeholder(name)
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node.op != "placeholder":
            _copy_node(new_graph, env, attrs, source, plan, node)
    module = fx.GraphModule(attrs, new_graph, class_name="QtuneGraph")
    module.graph.eliminate_dead_code()
    module.recompile()
    module.eval()
    return module


def lift(exported: torch.export.ExportedProgram, input_names: list[str]) -> LiftedGraph:
    """Rewrite the exported program into a GraphModule whose linear/conv/bn/relu are modules."""
    source = exported.module()
    plan = _plan_lift(source)
    module = _rebuild(source, plan, input_names)
    used = {n.target for n in module.graph.nodes if n.op == "call_module"}
    ops = [op for op in plan.ops if op.name in used]
    return LiftedGraph(module, ops, plan.not_lifted)


def fingerprint(module: nn.Module, extra: str = "") -> str:
    """Identity of a model: its graph code (when it has one) and every tensor it holds."""
    digest = hashlib.sha256(extra.encode())
    if isinstance(module, fx.GraphModule):
        digest.update(module.code.encode())
    state = module.state_dict(keep_vars=False)
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            digest.update(name.encode())
            digest.update(str(tuple(value.shape)).encode() + str(value.dtype).encode())
            digest.update(value.detach().contiguous().cpu().numpy().tobytes() if value.dtype != torch.bfloat16
                          else value.float().numpy().tobytes())
    return digest.hexdigest()[:16]
