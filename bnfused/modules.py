"""Drop-in BatchNorm modules: the classes of ``torch.nn`` with bnfused's forward.

Each class subclasses its ``torch.nn`` namesake, so the constructor, parameters, buffers,
``state_dict`` keys and versioning, ``reset_parameters``, input-dimension checks and
``isinstance(m, nn.BatchNorm2d)`` are torch's own. Added: ``activation=`` (fused relu/leaky_relu),
``negative_slope=`` and ``backend=`` keyword arguments.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Proxy
from torch.jit import is_scripting

from bnfused import activation as act_codes
from bnfused import backends, inplace, torch_ops
from bnfused.functional import backward_may_follow, batch_norm, check_arguments

# A tensor or None, in annotations TorchScript reads (forward's residual, the step counter): spelled with
# typing's name, as TorchScript evaluates annotations and `X | None` does not evaluate on Python 3.9.
MaybeTensor = Optional[torch.Tensor]  # noqa: UP045
_TENSOR_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_PLAIN_FLAG = "_bnfused_plain_lookup"


def _plain_lookup(cls: type) -> bool:
    """True when ``cls``'s instances find their parameters and buffers by nn.Module's own lookup: no
    ``__getattr__`` of its own and no class attribute under those names. Worked out once per class
    and kept on the class itself (in its own ``__dict__``, so a subclass works out its own); a class
    given a ``__getattr__`` after its first call keeps the answer it had."""
    plain = cls.__dict__.get(_PLAIN_FLAG)
    if plain is None:
        plain = cls.__getattr__ is nn.Module.__getattr__ and not any(hasattr(cls, n) for n in _TENSOR_NAMES)
        try:
            setattr(cls, _PLAIN_FLAG, plain)
        except (AttributeError, TypeError):  # a class that takes no attributes: worked out per call
            pass
    return plain


class _FusedBatchNorm:
    """The forward shared by every bnfused BatchNorm module (mirrors ``nn.modules.batchnorm._BatchNorm``)."""

    memory = "default"  # layers pickled before the option existed
    takes_residual = False  # set by the fusion pass on layers it rewrote to bn(x, residual)

    def _init_fused(
        self, activation: str | None, negative_slope: float, backend: str | None, memory: str = "default"
    ) -> None:
        # Fail at construction, not at the first forward.
        inplace.check_memory_mode(memory, *act_codes.parse(activation, negative_slope))
        self.activation = activation
        self.negative_slope = float(negative_slope)  # a float, whatever number type came (TorchScript)
        self.backend = None if backend is None else backends.check_name(backend)
        self.memory = memory

    def _tensors_and_momentum(self) -> tuple:
        """(weight, bias, running_mean, running_var, momentum), counting a training step in
        num_batches_tracked on the way (``_step_momentum``); None for what is absent or unused.

        Read from the module's parameter and buffer dicts: ``nn.Module.__getattr__`` costs about
        0.5 us a name, and a forward reads six, a sixth of a small layer's call. That is what the
        attribute lookup finds unless something else answers first (a class attribute such as a
        parametrization's property, a ``__getattr__`` override, an instance attribute) or a name is
        missing; then the names are read as attributes in the order torch's forward reads them, each
        only where it reads it (so a missing weight raises after the step is counted, as in torch).
        """
        # Dynamo traces attribute reads (and guards on them) as they are: compiled calls take them.
        if (
            not torch.compiler.is_compiling()
            and _plain_lookup(type(self))
            and self.__dict__.keys().isdisjoint(_TENSOR_NAMES)
        ):
            params, buffers = self._parameters, self._buffers
            try:
                weight, bias = params["weight"], params["bias"]
                running_mean, running_var = buffers["running_mean"], buffers["running_var"]
                num_batches_tracked = buffers["num_batches_tracked"]
            except KeyError:
                pass
            else:
                return weight, bias, running_mean, running_var, self._step_momentum(num_batches_tracked)
        training, tracked = self.training, self.track_running_stats
        momentum = self._step_momentum(self.num_batches_tracked if training and tracked else None)
        keep_running = not training or tracked
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        return self.weight, self.bias, running_mean, running_var, momentum

    def _batch_norm_args(self) -> tuple:
        """(running_mean, running_var, weight, bias, use_batch_stats, momentum) as torch's forward passes
        them to F.batch_norm, the tensors read by ``_tensors_and_momentum`` (which counts the step)."""
        weight, bias, running_mean, running_var, momentum = self._tensors_and_momentum()
        # Batch statistics in training, and in eval when there are no running stats to use.
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        return running_mean, running_var, weight, bias, use_batch_stats, momentum

    def _step_momentum(self, num_batches_tracked: MaybeTensor) -> float:
        """Counts a training step in num_batches_tracked (as torch does) and returns its momentum."""
        if self.training and self.track_running_stats and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                return 1.0 / float(num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def initialize_parameters(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        """Lazy classes: infers the channels from ``input`` on the first call (torch's lazy-module hook
        passes it every forward argument, the residual included)."""
        super().initialize_parameters(input)

    def forward(self, input: torch.Tensor, residual: MaybeTensor = None) -> torch.Tensor:
        """``act(bn(input) [+ residual])``; ``residual`` is the shortcut of a residual block."""
        if is_scripting():  # TorchScript compiles this branch alone
            return self._scripted_forward(input, residual)
        if residual is None and self.takes_residual:
            raise RuntimeError(
                f"bnfused: this {type(self).__name__} was fused with the residual add after it "
                "(convert_model(fuse=True)) and is called without the residual; a forward pre-hook must return "
                "all of its arguments, (input, residual), not the input alone"
            )
        if torch.compiler.is_compiling():  # asked once: the eager path pays for every question
            if self.momentum is None and self.training and self.track_running_stats:
                return self._cumulative_average_forward(input, residual)
            if self.memory == "default" and self._compiles_to_torch_ops(input):
                # The graph the functional path would give (torch's BatchNorm, the add, the activation),
                # traced through less of bnfused: every global and attribute Dynamo reads becomes a guard
                # that each call of the compiled model checks (tens of ns each).
                return self._scripted_forward(input, residual)
        if input.__class__ is not torch.Tensor and isinstance(input, Proxy):
            return self._fx_leaf(input, residual)
        if input.is_cuda and self.memory == "default" and self._defers_to_torch(input, residual):
            return self._deferred_forward(input, residual)
        if residual is not None and not isinstance(residual, torch.Tensor):
            # A number the fusion pass took for a tensor (a traced graph cannot tell them apart): a
            # 0-d tensor adds and promotes as the Python number would.
            residual = torch.as_tensor(residual, device=input.device)
        self._check_input_dim(input)
        # What _batch_norm_args gives, written out: a method call here is paid by every CPU call.
        weight, bias, running_mean, running_var, momentum = self._tensors_and_momentum()
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        keep_running = not self.training or self.track_running_stats
        return batch_norm(
            input,
            running_mean if keep_running else None,
            running_var if keep_running else None,
            weight,
            bias,
            use_batch_stats,
            momentum,
            self.eps,
            self.activation,
            self.negative_slope,
            self.backend,
            residual,
            self.memory,
        )

    def _defers_to_torch(self, input: torch.Tensor, residual: MaybeTensor) -> bool:
        """Whether "auto" leaves this call to torch's BatchNorm (``backends.defers_to_torch``)."""
        name = backends.resolve(self.backend, input.device)
        if name not in backends.DEFERS_WHEN_AUTO:
            return False
        if backends.defers_in_every_mode(self.backend, input):
            return True
        params, buffers = self._parameters, self._buffers
        training = self.training or (buffers.get("running_mean") is None and buffers.get("running_var") is None)
        residual = residual if isinstance(residual, torch.Tensor) else None
        backward = training and backward_may_follow(input, params.get("weight"), params.get("bias"), residual)
        return backends.defers_to_torch(self.backend, name, input, training, backward)

    def _deferred_forward(self, input: torch.Tensor, residual: MaybeTensor) -> torch.Tensor:
        """A call "auto" leaves to torch (``backends.auto_policy``: torch's BatchNorm is faster there):
        torch's ops, with none of bnfused's per-call work (a GPU layer can take microseconds), the
        module's tensors read as the fused path reads them (an attribute read costs about 0.4 us)."""
        self._check_input_dim(input)
        return self._add_and_activate(F.batch_norm(input, *self._batch_norm_args(), self.eps), residual)

    def _compiles_to_torch_ops(self, input: torch.Tensor) -> bool:
        """Under torch.compile: whether this call becomes torch's ops (``torch_ops.use_torch_ops``)."""
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return torch_ops.use_torch_ops(input, use_batch_stats)

    def _scripted_forward(self, input: torch.Tensor, residual: MaybeTensor = None) -> torch.Tensor:
        """The forward under ``torch.jit.script``: torch's own BatchNorm forward (the code of
        ``nn.modules.batchnorm._BatchNorm.forward``), then the residual add and the activation, as torch
        ops. TorchScript calls no Python autograd Function, and a scripted model saved with
        ``torch.jit.save`` then loads and runs where bnfused is not installed (libtorch included)."""
        self._check_input_dim(input)
        # The step counter read only where torch's forward reads it (under torch.compile a read
        # is a guard, checked at every call).
        tracked = self.num_batches_tracked if self.training and self.track_running_stats else None
        momentum = self._step_momentum(tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        y = torch_ops.normalize(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        return self._add_and_activate(y, residual)

    def _cumulative_average_forward(self, input: torch.Tensor, residual: MaybeTensor) -> torch.Tensor:
        """A training step with ``momentum=None`` (running stats as a cumulative average) under
        torch.compile or export: torch's forward takes the step's factor 1 / num_batches_tracked as a
        Python float, a graph break after which the rest of the frame is specialised on that float (a
        recompile at every step). Here the factor stays a tensor, and the graph holds the update."""
        self._check_input_dim(input)
        running_mean, running_var, steps = self.running_mean, self.running_var, self.num_batches_tracked
        if running_mean is None or running_var is None or steps is None:  # torch's own corner cases
            return self._scripted_forward(input, residual)
        steps.add_(1)
        # torch's checks of the running stats (dtype, shape), which F.batch_norm does not see here: given
        # to it, they would be saved for its backward, and the update below would then fail it.
        check_arguments(input, running_mean, running_var, self.weight, self.bias)
        y = torch_ops.normalize(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if input.numel() == 0:  # an empty batch leaves the running stats as they are
            return self._add_and_activate(y, residual)
        # Statistics and update in float32 or wider, rounded once into the buffers, as torch's kernels do
        # (from the detached input: nothing here is recorded for backward).
        acc = torch.float64 if torch.float64 in (input.dtype, running_mean.dtype) else torch.float32
        var, mean = torch.var_mean(input.detach().to(acc), [0, *range(2, input.dim())], correction=1)
        factor = 1.0 / steps.to(torch.float64)
        keep, take = (1 - factor).to(acc), factor.to(acc)
        running_mean.copy_(running_mean.to(acc) * keep + mean * take)
        running_var.copy_(running_var.to(acc) * keep + var * take)
        return self._add_and_activate(y, residual)

    def _add_and_activate(self, y: torch.Tensor, residual: MaybeTensor) -> torch.Tensor:
        """``act(y [+ residual])`` for a BatchNorm output y, in torch ops."""
        if residual is not None:
            y = y + residual
        return act_codes.apply_named(y, self.activation, self.negative_slope)

    def _fx_leaf(self, input: Proxy, residual: Proxy | None = None) -> Proxy:
        """Records this layer in a ``torch.fx`` graph as one ``call_module`` node, as torch's BatchNorm is.

        ``torch.fx.Tracer`` treats modules of ``torch.nn`` as leaves (``is_leaf_module``), so a traced
        GraphModule calls them and keeps their train/eval switch; bnfused's classes live elsewhere, so
        the tracer calls this forward with a Proxy, and the layer records itself the same way, for any
        Tracer. The traced root module itself cannot be its own node: it is traced like torch's
        (which raises on the Proxy in ``_check_input_dim``).
        """
        tracer = input.tracer
        if getattr(tracer, "root", None) is self:
            self._check_input_dim(input)
        args = (input,) if residual is None else (input, residual)
        return tracer.create_proxy("call_module", tracer.path_of_module(self), args, {})

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if act_codes.parse(self.activation, self.negative_slope)[0] == act_codes.LEAKY_RELU:
                text += f", negative_slope={self.negative_slope}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        if self.memory != "default":
            text += f", memory={self.memory!r}"
        return text


def swap_submodules(module: nn.Module, swap) -> None:
    """Replaces each submodule below ``module`` for which ``swap(submodule)`` gives a new module, and
    looks inside those for which it gives None. A module registered under several names (a layer
    shared by two branches) is swapped once and stays one module under all of them."""
    done: dict[int, tuple[nn.Module, nn.Module]] = {}  # id -> (module, result): the module kept, its id its own

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                new = swap(child)
                done[id(child)] = (child, child if new is None else new)
                if new is None:
                    walk(child)
            parent._modules[name] = done[id(child)][1]

    walk(module)


def _signature(torch_cls: type, fused_init) -> inspect.Signature:
    """torch_cls's constructor signature and the keyword-only options of ``fused_init``: what
    ``inspect.signature`` reports, so that code reading it finds torch's arguments
    (``nn.utils.skip_init`` asks for ``device``)."""
    torch_params = inspect.signature(torch_cls.__init__).parameters.values()
    options = [p for p in inspect.signature(fused_init).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return inspect.signature(torch_cls.__init__).replace(parameters=[*torch_params, *options])


def _fused_class(torch_cls: type, doc: str) -> type:
    def __init__(self, *args, activation=None, negative_slope=0.01, backend=None, memory="default", **kwargs):
        torch_cls.__init__(self, *args, **kwargs)
        self._init_fused(activation, negative_slope, backend, memory)

    __init__.__signature__ = _signature(torch_cls, __init__)
    return type(
        torch_cls.__name__, (_FusedBatchNorm, torch_cls), {"__init__": __init__, "__doc__": doc, "__module__": __name__}
    )


_DOC = """Drop-in for ``torch.nn.{name}`` (same constructor, state_dict and behaviour).

    Extra keyword arguments: ``activation`` (None, "relu", "leaky_relu", "relu6", "hardswish",
    "silu", "sigmoid") applied after the affine step (and the residual add of ``forward(input, residual)``),
    ``negative_slope`` for leaky_relu, ``backend`` ("auto", "triton", "cpp", "cuda", "reference";
    None follows ``bnfused.set_backend``), ``memory`` ("default", or "inplace": keep only the output
    for backward; see ``bnfused.inplace``). Input: {shape}.
    """

BatchNorm1d = _fused_class(nn.BatchNorm1d, _DOC.format(name="BatchNorm1d", shape="(N, C) or (N, C, L)"))
BatchNorm2d = _fused_class(nn.BatchNorm2d, _DOC.format(name="BatchNorm2d", shape="(N, C, H, W)"))
BatchNorm3d = _fused_class(nn.BatchNorm3d, _DOC.format(name="BatchNorm3d", shape="(N, C, D, H, W)"))
LazyBatchNorm1d = _fused_class(nn.LazyBatchNorm1d, _DOC.format(name="LazyBatchNorm1d", shape="(N, C) or (N, C, L)"))
LazyBatchNorm2d = _fused_class(nn.LazyBatchNorm2d, _DOC.format(name="LazyBatchNorm2d", shape="(N, C, H, W)"))
LazyBatchNorm3d = _fused_class(nn.LazyBatchNorm3d, _DOC.format(name="LazyBatchNorm3d", shape="(N, C, D, H, W)"))
# Once its parameters are inferred, a lazy module turns into this class (torch's would drop the fusion).
LazyBatchNorm1d.cls_to_become = BatchNorm1d
LazyBatchNorm2d.cls_to_become = BatchNorm2d
LazyBatchNorm3d.cls_to_become = BatchNorm3d


def _relu_class(base: type) -> type:
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("activation", "relu")
        base.__init__(self, *args, **kwargs)

    base_sig = base.__init__.__signature__
    relu = [p.replace(default="relu") if p.name == "activation" else p for p in base_sig.parameters.values()]
    __init__.__signature__ = base_sig.replace(parameters=relu)
    name = base.__name__.replace("BatchNorm", "BatchNormReLU")
    doc = f"``{base.__name__}`` followed by a ReLU, fused in one kernel (``activation='relu'``)."
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


BatchNormReLU1d = _relu_class(BatchNorm1d)
BatchNormReLU2d = _relu_class(BatchNorm2d)
BatchNormReLU3d = _relu_class(BatchNorm3d)

# torch class -> bnfused class, for convert_model.
EQUIVALENTS = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.LazyBatchNorm1d: LazyBatchNorm1d,
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
}
