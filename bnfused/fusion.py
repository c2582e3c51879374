"""The fusion pass of ``convert_model(fuse=True)``: find ``BN -> act`` and ``BN -> add -> act`` in a
model's forward with ``torch.fx`` and turn each into one bnfused layer.

ResNets apply their ReLU after the residual add inside ``BasicBlock.forward``, MobileNetV3 uses
hardswish, EfficientNet SiLU: none of these is an ``nn.ReLU`` next to a BatchNorm in an
``nn.Sequential``, so only the traced forward shows them. The pass traces the model (BatchNorms and
every submodule without a BatchNorm inside stay leaves, so their own forward, e.g. a stochastic
depth that depends on ``self.training``, is called rather than baked into the graph), matches

    bn(x) -> act                      bn(x) + r -> act                      bn(x) + r

where ``bn``'s output has no other use, the add's output feeds only the activation, and each
BatchNorm module is called once; then it rewrites the BatchNorm's node to ``bn(x, r)`` with the
activation set on the (bnfused) module, and drops the add and activation nodes. The rewritten model
is a ``torch.fx.GraphModule`` holding the same submodules under the same names, so its state_dict
keys are the original's and checkpoints load both ways.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import operator
import textwrap
import threading
import tokenize
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bnfused import activation as act_codes
from bnfused import inplace
from bnfused.graph_module import FusedGraphModule, fused_graph_module

_BN = nn.modules.batchnorm._BatchNorm

_ACTIVATION_MODULES = {nn.ReLU: act_codes.RELU, nn.ReLU6: act_codes.RELU6, nn.Hardswish: act_codes.HARDSWISH,
                       nn.SiLU: act_codes.SILU, nn.Sigmoid: act_codes.SIGMOID}  # fmt: skip
_ACTIVATION_FUNCTIONS = {
    F.relu: act_codes.RELU, torch.relu: act_codes.RELU, F.relu_: act_codes.RELU, torch.relu_: act_codes.RELU,
    F.relu6: act_codes.RELU6, F.hardswish: act_codes.HARDSWISH, F.silu: act_codes.SILU,
    torch.sigmoid: act_codes.SIGMOID, torch.sigmoid_: act_codes.SIGMOID, F.sigmoid: act_codes.SIGMOID,
}  # fmt: skip
_ACTIVATION_METHODS = {"relu": act_codes.RELU, "relu_": act_codes.RELU, "sigmoid": act_codes.SIGMOID,
                       "sigmoid_": act_codes.SIGMOID}  # fmt: skip
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


@dataclass
class Site:
    """One fusion: the BatchNorm's node, the add (or None) and its other operand, the activation node
    (or None) and its (code, slope)."""

    bn: fx.Node
    add: fx.Node | None
    residual: fx.Node | None
    act: fx.Node | None
    code: int
    slope: float

    @property
    def last(self) -> fx.Node:
        return self.act or self.add or self.bn


class _Tracer(fx.Tracer):
    """Traces through modules that contain a BatchNorm and whose code is mode-independent; keeps
    every other module a leaf (called as it is, with its own train/eval behaviour)."""

    def __init__(self, root: nn.Module | None = None):  # no-argument form: GraphModule's unpickling
        super().__init__()
        modules = [] if root is None else root.modules()
        self._traced = {m for m in modules if any(isinstance(s, _BN) for s in m.modules()) and not _mode_reason(m)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BN) or m not in self._traced or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        _Watch.check_context()
        return super().call_module(m, forward, args, kwargs)


def _mode_reason(model: nn.Module) -> str | None:
    """Why tracing through ``model`` would freeze behaviour, or None: a traced forward is frozen in the
    mode it was traced in, so a class whose code reads ``self.training`` (a dropout's flag, Inception's
    auxiliary logits) stays a leaf; so does a class whose source cannot be read, and one that overrides
    ``train()`` or ``eval()`` (a backbone that keeps its BatchNorms' statistics frozen): fx would put a
    plain container in its place, whose ``train()`` is nn.Module's."""
    for name in ("train", "eval"):  # the class whose method runs, wherever else the MRO defines one
        owner = next(cls for cls in type(model).__mro__ if name in vars(cls))
        if not _is_torchs(owner):
            return f"{owner.__name__} overrides {name}()"
    for cls in type(model).__mro__:
        if _is_torchs(cls):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            return f"the source of {cls.__name__} is not available"
        if _reads_training(source):
            return f"{cls.__name__} depends on self.training"
    return None


def _is_torchs(cls: type) -> bool:
    """torch's own classes, and FusedGraphModule: a GraphModule's forward is generated from its graph,
    which holds no flag reads."""
    return cls in (nn.Module, object, FusedGraphModule) or cls.__module__.startswith(("torch.nn", "torch.fx"))


def _reads_training(source: str) -> bool:
    """Whether code (not a comment or docstring) names ``training``: ``self.training``, a string that is just
    the name, as in ``getattr(self, "training")``, or an f-string that mentions it. Code that cannot be
    tokenized counts as reading it."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return "training" in source
    for token in tokens:
        if token.type == tokenize.NAME and token.string == "training":
            return True
        if token.type == tokenize.STRING:
            prefix = token.string[: len(token.string) - len(token.string.lstrip("rRbBuUfF"))]
            if token.string[len(prefix) :].strip("'\"") == "training" or (
                "f" in prefix.lower() and "training" in token.string
            ):
                return True  # getattr(self, "training"), or an f-string before Python 3.12 (one token)
    return False


def untraceable_reason(model: nn.Module) -> str | None:
    """Why the pass does not trace ``model`` itself, or None (see ``_mode_reason``). A forward with
    optional arguments is not traced either: a trace would fix them to what the tracer passed."""
    reason = _mode_reason(model)
    if reason is not None:
        return reason
    unwritable = [n for n, _ in model.named_modules() if any(c in n for c in '\\"\n')]
    if unwritable:  # fx's code would name it unescaped: a model that runs but does not pickle or script
        return f"torch.fx cannot write the submodule name {unwritable[0]!r} in its code"
    optional = [p.name for p in inspect.signature(model.forward).parameters.values() if p.default is not p.empty]
    if optional:
        return f"{type(model).__name__}.forward has optional arguments ({', '.join(optional)})"
    return None


class Untraceable(Exception):
    """A trace that would not behave as the model does; the message says why."""


# Attributes torch.fx sets on the traced root for the constants it meets (_tensor_constant0, ...).
_FX_CONSTANT_PREFIXES = ("_tensor_constant", "_torchbind_obj", "_tree_spec_constant", "_opaque_obj")


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autograd_context() -> tuple:
    """What a ``with`` block in a forward can change for the calls inside it and a graph does not hold:
    grad mode (``torch.no_grad()``, reentrant activation checkpointing), inference mode, autocast, and
    saved-tensor hooks (non-reentrant checkpointing, ``save_on_cpu``)."""
    autocast = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, hooks


@contextlib.contextmanager
def _all_modes(on: bool):
    """Grad on, inference mode and autocast (every device type) off; or the reverse. A forward is traced
    in both, whatever the caller's modes, so that a block that sets any of them changes it in one trace
    at least (``torch.no_grad()`` in the first, ``torch.autocast(..., enabled=False)`` in the second)."""
    saved = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]
    try:
        for d in _AUTOCAST_DEVICES:
            torch.set_autocast_enabled(d, on)
        with torch.inference_mode(on), torch.set_grad_enabled(not on):
            yield
    finally:
        for d, enabled, dtype in saved:
            torch.set_autocast_enabled(d, enabled)
            torch.set_autocast_dtype(d, dtype)


class _Watch(TorchFunctionMode):
    """Watches a trace for what its graph would not hold.

    ``read``: the first tensor (not one being traced) that the forward turns into a Python number or
    bool: ``torch.rand(1).item()``, ``if self.flag:`` on a buffer. The graph holds only the number, so
    the draw, or the buffer's value of that moment, would be frozen.
    ``context_changed``: a call made under another autograd context than the trace's (see
    ``_autograd_context``): the graph would run that call without its ``with`` block.
    ``function``: the first custom ``torch.autograd.Function`` applied while traced: fx traces through
    its forward, and the graph keeps neither the Function nor its backward."""

    _TO_PYTHON = frozenset((
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
        torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__complex__,
    ))  # fmt: skip

    _active: _Watch | None = None  # the watch of the trace in progress, for _Tracer.call_module
    # One trace at a time: the watch wraps a process-wide Function.apply, and torch.fx patches globals
    # while it traces. Calls from other threads are not the traced forward's.
    _lock = threading.RLock()

    def __init__(self):
        super().__init__()
        self.read = None
        self.context_changed = False
        self.function = None
        self._context = None
        self._apply = None
        self._thread = None

    def begin(self) -> None:
        """Takes the autograd context a trace starts in as the one every call should see."""
        self._context = _autograd_context()

    def end(self) -> None:
        self._context = None

    def __enter__(self):
        _Watch._lock.acquire()
        self._thread = threading.get_ident()
        _Watch._active = self
        # Function.apply is not seen by torch function modes: it is wrapped while the watch is on.
        self._apply = original = torch.autograd.Function.__dict__["apply"]

        def apply(cls, *args, **kwargs):
            watch = _Watch._watching()
            if watch is not None and watch.function is None:
                watch.function = cls.__name__
            return original.__get__(None, cls)(*args, **kwargs)

        torch.autograd.Function.apply = classmethod(apply)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            _Watch._active = None
            torch.autograd.Function.apply = self._apply
            return super().__exit__(*exc)
        finally:
            _Watch._lock.release()

    @staticmethod
    def _watching() -> _Watch | None:
        """The watch of a trace running on this thread, or None."""
        watch = _Watch._active
        if watch is None or watch._context is None or watch._thread != threading.get_ident():
            return None
        return watch

    @staticmethod
    def check_context() -> None:
        watch = _Watch._watching()
        if watch is not None and _autograd_context() != watch._context:
            watch.context_changed = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.read is None and func in self._TO_PYTHON and isinstance(args[0], torch.Tensor):
            self.read = f"Tensor.{func.__name__}"
        self.check_context()
        return func(*args, **(kwargs or {}))


class _State:
    """The parameters and buffers of a model, to find (and undo) what its forward changed while traced:
    an in-place update of a buffer (``self.count += 1``) or a tensor assigned in its place runs on
    the real tensors, once, and leaves no node in the graph."""

    def __init__(self, model: nn.Module):
        self.entries = []  # (name, module, key, tensor, version, copy of a buffer's values)
        for module_name, module in model.named_modules():
            for kind in ("_parameters", "_buffers"):
                for key, tensor in getattr(module, kind).items():
                    if tensor is not None:
                        saved = tensor.detach().clone() if kind == "_buffers" else None
                        name = f"{module_name}.{key}" if module_name else key
                        self.entries.append((name, module, kind, key, tensor, tensor._version, saved))

    def restore_changed(self) -> str | None:
        """Puts back what changed; returns the first changed name, or None."""
        changed = None
        for name, module, kind, key, tensor, version, saved in self.entries:
            replaced, written = getattr(module, kind).get(key) is not tensor, tensor._version != version
            if replaced:
                getattr(module, kind)[key] = tensor
            if written and saved is not None:
                with torch.no_grad():
                    tensor.copy_(saved)
            if replaced or written:
                changed = changed or name
        return changed


def _trace_twice(model: nn.Module, watch: _Watch) -> tuple[fx.Graph, fx.Graph]:
    """The graph in the model's modes, and the graph with every module's train/eval flag flipped (put
    back afterwards; set directly, not through ``train()``, which a module may override). Traced classes
    whose own code reads ``self.training`` are leaves already (``_mode_reason``); a difference between
    the two comes from code the pass cannot see, such as a function that reads ``module.training``.
    The two traces run in opposite autograd modes (``_all_modes``), so that ``watch`` sees any block
    that sets one of them."""
    with _all_modes(False):
        watch.begin()
        graph = _Tracer(model).trace(model)
        watch.end()
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, training in modes:
            m.training = not training
        with _all_modes(True):
            watch.begin()
            other = _Tracer(model).trace(model)
            watch.end()
    finally:
        for m, training in modes:
            m.training = training
    return graph, other


def _same_code(a: fx.Graph, b: fx.Graph) -> bool:
    return a.python_code("self").src == b.python_code("self").src


def trace(model: nn.Module) -> fx.GraphModule:
    """The traced model, holding every submodule, parameter and buffer of ``model`` under its name.

    Raises ``Untraceable`` where the trace would freeze what the forward does at every call: where it
    uses a tensor that is neither a parameter nor a buffer (the trace would hold its value at trace
    time as a constant, and the GraphModule as a buffer, a state_dict key the model does not have: a
    tensor made without tensor inputs, as ``torch.rand(1)``, would no longer be made per call), turns
    a tensor into a Python value, calls something inside a ``with`` block that changes autograd or
    autocast (``_Watch``: ``torch.no_grad()``, activation checkpointing, ``torch.autocast``), gives
    another graph in the other train/eval mode (``_trace_twice``), or changes a parameter or
    buffer (``_State``; the change is undone)."""
    before = set(vars(model))
    state = _State(model)
    watch = _Watch()
    try:
        with watch:
            graph, other_mode = _trace_twice(model, watch)
    finally:
        for name in set(vars(model)) - before:
            if name.startswith(_FX_CONSTANT_PREFIXES):
                delattr(model, name)
        changed = state.restore_changed()
    if watch.read is not None:
        raise Untraceable(
            f"its forward turns a tensor into a Python value ({watch.read}: a random draw or a buffer's value "
            "would be read once, while tracing, and frozen)"
        )
    if watch.function is not None:
        raise Untraceable(
            f"its forward applies the autograd.Function {watch.function}, whose backward a torch.fx graph does not keep"
        )
    if watch.context_changed:
        raise Untraceable(
            "its forward calls part of the model inside a block that changes autograd or autocast (torch.no_grad, "
            "torch.autocast, activation checkpointing, saved-tensor hooks), which a torch.fx graph does not hold"
        )
    if changed:
        raise Untraceable(
            f"its forward changes {changed!r} (a trace would run that once, while tracing, not at every call)"
        )
    held = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    held.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in held:
            what = (
                "a tensor its forward makes without tensor inputs (such as torch.rand(1) or torch.tensor(...))"
                if node.target.startswith(_FX_CONSTANT_PREFIXES)
                else f"the tensor attribute {node.target!r}, neither a parameter nor a buffer,"
            )
            raise Untraceable(f"a torch.fx trace would hold {what} as a constant")
    if not _same_code(graph, other_mode):
        raise Untraceable(
            "its forward differs with every module's train/eval flag flipped and grad, inference mode and autocast "
            "switched, through code the pass does not read (such as a function that reads module.training, or a "
            "branch on torch.is_grad_enabled()), which a trace would freeze in one of them"
        )
    return fused_graph_module(model, graph)


def _activation(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, float] | None:
    """(code, slope) when ``node`` applies a fusable activation to its first argument, else None."""
    if node.op == "call_module":
        module = modules[node.target]
        if has_hooks(module):
            return None
        if type(module) is nn.LeakyReLU:
            return (act_codes.LEAKY_RELU, module.negative_slope) if module.negative_slope >= 0 else None
        code = _ACTIVATION_MODULES.get(type(module))
        return None if code is None or len(node.args) != 1 or node.kwargs else (code, 0.0)
    extra_args = node.args[1:]
    extra_kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "call_function" and node.target is F.leaky_relu:
        slope = extra_args[0] if extra_args else extra_kwargs.pop("negative_slope", 0.01)
        if len(extra_args) > 1 + ("inplace" not in node.kwargs) or extra_kwargs or not isinstance(slope, float):
            return None
        return (act_codes.LEAKY_RELU, slope) if slope >= 0 else None
    if extra_kwargs or any(not isinstance(a, bool) for a in extra_args):  # only an inplace flag may follow
        return None
    if node.op == "call_function":
        code = _ACTIVATION_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        code = _ACTIVATION_METHODS.get(node.target)
    else:
        code = None
    return None if code is None else (code, 0.0)


def _residual_of_add(node: fx.Node, operand: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``operand + other`` (or ``other + operand``) of two nodes."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if node.op == "call_method" and a is not operand:  # other.add_(bn(x)) writes into other: not ours
        return None
    if node.target is operator.iadd and a is not operand:  # t += bn(x) writes into t, which may live on
        return None
    other = b if a is operand else a if b is operand else None
    return other if isinstance(other, fx.Node) and other is not operand and not _is_number(other) else None


# Python's arithmetic, which gives a number when all its operands are numbers (``x.size(1) * 0.5``).
_ARITHMETIC = frozenset((
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs,
))  # fmt: skip
# Tensor methods and attributes that give numbers (or sizes, indexed into numbers).
_NUMBER_METHODS = frozenset(("size", "dim", "ndimension", "numel", "nelement", "element_size", "item", "__len__"))
_NUMBER_ATTRIBUTES = frozenset(("shape", "ndim"))


def _is_number(node: fx.Node) -> bool:
    """Whether ``node`` is known to give a Python number, such as ``x.size(0)``, ``x.shape[-1]`` or
    arithmetic on them (``x.size(1) * 0.5``): the layer's residual must be a tensor under TorchScript,
    so ``bn(x) + x.size(0)`` stays unfused (a traced graph does not say what type the other nodes
    give; eager calls take numbers as well)."""
    if node.op == "call_method":
        return node.target in _NUMBER_METHODS
    if node.op != "call_function":
        return False
    if node.target in (len, torch.numel) or getattr(node.target, "__module__", None) == "math":
        return True
    if node.target is getattr:
        return len(node.args) >= 2 and node.args[1] in _NUMBER_ATTRIBUTES
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _is_number(node.args[0])
    if node.target in _ARITHMETIC and not node.kwargs:
        return all(_is_number(a) if isinstance(a, fx.Node) else isinstance(a, (int, float)) for a in node.args)
    return False


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own. A fused layer's hooks would see
    what the fused call takes and gives (``bn(x, residual)``, ``act(bn(x) + residual)``), not what
    they were written for; those of an activation folded into the BatchNorm would no longer run."""
    return any(
        getattr(module, name, None)
        for name in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    )


def _fusable(module: nn.Module) -> bool:
    """A BatchNorm the pass may rewrite: torch's own classes (converted afterwards) and bnfused's,
    with no activation or residual of their own yet and no hooks; not subclasses with a forward of
    their own."""
    from bnfused.modules import EQUIVALENTS, _FusedBatchNorm
    from bnfused.sync import SyncBatchNorm

    if has_hooks(module):
        return False
    if isinstance(module, _FusedBatchNorm):
        return not isinstance(module, SyncBatchNorm) and module.activation is None and not module.takes_residual
    return type(module) in EQUIVALENTS


# ------------------------------------------------------------------ in-place writes between BN and add
#
# A fused BN -> add runs where the add was, after the nodes between them: the rewrite is faithful
# only if none of those writes in place into the BatchNorm's input, or into a tensor that may share
# its memory (``h.relu_()`` on the conv output the BatchNorm read, before the shortcut uses it).

# Calls that return a new tensor, never their argument or a view of it (not operator.add nor mul,
# which join tuples: ``h.chunk(2) + x.chunk(2)`` holds views of h).
_NEW_TENSOR_MODULES = (
    nn.modules.conv._ConvNd, nn.Linear, _BN, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)  # fmt: skip
_NEW_TENSOR_FUNCTIONS = frozenset((
    operator.sub, operator.truediv, operator.neg, operator.matmul, torch.add, torch.sub, torch.mul, torch.cat,
    torch.stack, F.conv1d, F.conv2d, F.conv3d, F.linear, F.pad, F.avg_pool2d, F.max_pool2d,
    F.adaptive_avg_pool2d, F.interpolate,
))  # fmt: skip
_NEW_TENSOR_METHODS = frozenset(("add", "sub", "mul", "div", "mean", "sum", "clone", "matmul"))
_IN_PLACE_OPERATORS = frozenset((
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
    operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.setitem,
))  # fmt: skip


def _writes_in_place(module: nn.Module) -> bool:
    """Whether a leaf module may write into its inputs: one of torch.nn's with ``inplace=True`` inside,
    a bnfused layer with ``memory="inplace"``, or any other class (its code is not read)."""
    for m in module.modules():
        if type(m).__module__.startswith("bnfused."):
            if getattr(m, "memory", None) == "inplace":
                return True
        elif not type(m).__module__.startswith("torch.nn.") or getattr(m, "inplace", False):
            return True
    return False


def _gives_new_tensor(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, _NEW_TENSOR_MODULES) and not _writes_in_place(module)
    if node.op == "call_function":
        return node.target in _NEW_TENSOR_FUNCTIONS and not _written(node, modules)
    return node.op == "call_method" and node.target in _NEW_TENSOR_METHODS


def _written(node: fx.Node, modules: dict[str, nn.Module]) -> list:
    """The arguments ``node`` may write into in place."""
    if node.op == "call_module":
        return list(node.all_input_nodes) if _writes_in_place(modules[node.target]) else []
    if node.op == "call_method":
        name = node.target
        in_place = (name.endswith("_") and not name.startswith("__")) or name in ("__setitem__", "__iadd__")
        return list(node.args[:1]) if in_place else []
    if node.op != "call_function":
        return []
    out = node.kwargs.get("out")
    if out is not None:
        return [out]
    schema = getattr(node.target, "_schema", None)  # an aten overload: torch.ops.aten.relu_.default
    in_place = (
        node.target in _IN_PLACE_OPERATORS
        or (schema is not None and schema.is_mutable)
        or getattr(node.target, "__name__", "").endswith("_")  # torch.relu_, F.relu_, torch.sigmoid_
        or node.kwargs.get("inplace") is True
        or any(arg is True for arg in node.args[1:])  # F.relu(x, True)
    )
    return list(node.args[:1]) if in_place else []


def _sharing_memory(node: fx.Node, nodes: list[fx.Node], modules: dict[str, nn.Module]) -> set[fx.Node]:
    """The nodes whose tensors may share memory with ``node``'s: through every call not known to give a
    new tensor, in both directions (what a view was taken of, and the views taken of it). A method's
    result may be its tensor (``t.relu_()``) or a view of it (``t.flatten(1)``); a function's or a
    module's, any of their inputs."""
    reads: dict[str, set[fx.Node]] = {}  # each read of a parameter or buffer gives the same tensor
    for n in nodes:
        if n.op == "get_attr":
            reads.setdefault(n.target, set()).add(n)
    group = {node}
    grown = True
    while grown:
        grown = False
        for n in nodes:
            if n.op == "get_attr":
                linked = reads[n.target]
            elif _gives_new_tensor(n, modules):
                continue
            elif n.op == "call_method" and n.args and isinstance(n.args[0], fx.Node):
                linked = {n, n.args[0]}
            else:
                linked = {n, *n.all_input_nodes}
            if n in group or group & linked:
                new = linked - group
                if new:
                    group |= new
                    grown = True
    return group


def _input_written_before_add(site_bn: fx.Node, add: fx.Node, nodes: list[fx.Node], modules) -> bool:
    """Whether a node between the BatchNorm and the add writes (or may write) into the BatchNorm's
    input, or reads the BatchNorm's own state, which moving the BatchNorm past it would change."""
    between = nodes[nodes.index(site_bn) + 1 : nodes.index(add)]
    prefix = site_bn.target + "."
    if any(n.op == "get_attr" and n.target.startswith(prefix) for n in between):
        return True
    written = {w for n in between for w in _written(n, modules) if isinstance(w, fx.Node)}
    return bool(written) and bool(written & _sharing_memory(site_bn.args[0], nodes, modules))


def _fusable_activation(node: fx.Node, module: nn.Module, modules: dict[str, nn.Module]) -> tuple[int, float] | None:
    """``_activation(node)`` where ``module`` can run it: a layer already set to memory="inplace" takes
    only an invertible one."""
    found = _activation(node, modules)
    if found is not None and getattr(module, "memory", "default") == "inplace":
        try:
            inplace.check_memory_mode("inplace", *found)
        except ValueError:
            return None
    return found


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every ``BN -> [add] -> [act]`` the pass can fuse, in graph order; each add is used once."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    sites, taken = [], set()
    nodes = None  # in graph order, listed at the first add
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _fusable(modules[node.target]) or calls[node.target] != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        user = _only_user(node)
        if user is None or user in taken:
            continue
        found = _fusable_activation(user, modules[node.target], modules)
        if found is not None:
            sites.append(Site(node, None, None, user, *found))
            taken.add(user)
            continue
        residual = _residual_of_add(user, node)
        lazy = isinstance(modules[node.target], nn.modules.lazy.LazyModuleMixin)
        if residual is None or lazy:  # a lazy layer's first call infers its size from one input
            continue
        if nodes is None:
            nodes = list(gm.graph.nodes)
        if _input_written_before_add(node, user, nodes, modules):
            continue
        after = _only_user(user)
        found = _fusable_activation(after, modules[node.target], modules) if after is not None else None
        sites.append(Site(node, user, residual, after if found else None, *(found or (act_codes.NONE, 0.0))))
        taken.update(n for n in (user, after if found else None) if n is not None)
    return sites


def apply_sites(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Rewrites each site into one call of its (bnfused) BatchNorm module, which gets the activation."""
    replaced: dict[fx.Node, fx.Node] = {}  # a fused block's output is the next block's residual
    for site in sites:
        module = gm.get_submodule(site.bn.target)
        module.activation = act_codes.NAMES[site.code]
        module.negative_slope = site.slope if site.code == act_codes.LEAKY_RELU else module.negative_slope
        last = site.last
        if site.residual is not None:
            module.takes_residual = True  # revert_model cannot turn this back into a torch layer
            # After both operands: ResNet's shortcut (downsample) is computed after the BatchNorm.
            site.add.prepend(site.bn)
            site.bn.args = (site.bn.args[0], replaced.get(site.residual, site.residual))
        if last is not site.bn:
            last.replace_all_uses_with(site.bn)
            replaced[last] = site.bn
            for node in (site.act, site.add):
                if node is not None:
                    gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
