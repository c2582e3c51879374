"""``convert_model``: swap the BatchNorm layers of an existing model for bnfused's, and
``revert_model``: swap them back for torch's (for tools that match torch's exact classes)."""

from __future__ import annotations

import warnings

from torch import nn

from bnfused import activation as act_codes
from bnfused import fusion, inplace
from bnfused.modules import EQUIVALENTS, _FusedBatchNorm, swap_submodules
from bnfused.sync import SyncBatchNorm

_FUSED_ATTRIBUTES = ("activation", "negative_slope", "backend", "memory")


def _swap_class(bn: nn.Module, cls: type) -> nn.Module:
    """``bn`` as an instance of ``cls``: the same Parameter and buffer objects, hooks and train/eval
    flag, so optimizers keep working. The registries are copied, so the old module and the new one
    don't share later changes."""
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        # Its hooks are bound to the old object: build a fresh lazy module with the same settings.
        template = bn.weight if bn.affine else bn.running_mean
        kwargs = {"device": template.device, "dtype": template.dtype} if template is not None else {}
        if bn.affine and bn.bias is None:
            kwargs["bias"] = False  # torch's bias=False (newer than torch 2.11, which has no such argument)
        return cls(bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kwargs).train(bn.training)
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in bn.__dict__.items()})
    return new


def _convert_one(bn: nn.Module, backend: str | None) -> nn.Module:
    new = _swap_class(bn, EQUIVALENTS[type(bn)])
    new._init_fused(None, 0.01, backend)
    return new


def _fuse_following_relu(seq: nn.Sequential, shared: set[int]) -> None:
    """Folds each ReLU that follows a bnfused layer in ``seq`` into it. Not where the layer is also
    used elsewhere (``shared``: the ReLU would then run after it there too) or where either module has
    hooks (``fusion.has_hooks``)."""
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        bn, nxt = seq._modules[first], seq._modules[second]
        if not isinstance(bn, _FusedBatchNorm) or bn.activation is not None or id(bn) in shared:
            continue
        if fusion.has_hooks(bn) or fusion.has_hooks(nxt):
            continue
        if type(nxt) is nn.ReLU:
            bn.activation = "relu"
        elif type(nxt) is nn.LeakyReLU and nxt.negative_slope >= 0:
            bn.activation, bn.negative_slope = "leaky_relu", nxt.negative_slope
        else:
            continue
        seq._modules[second] = nn.Identity()  # keeps the indices (and state_dict keys) of what follows


def convert_model(
    model: nn.Module,
    fuse_relu: bool = False,
    backend: str | None = None,
    sync: bool = False,
    fuse: bool = False,
    memory: str = "default",
) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` (and lazy variant) in ``model`` with bnfused's.

    Parameters, buffers, device, dtype and train/eval state are kept (the very same tensors). With
    ``fuse_relu=True``, an ``nn.ReLU`` (or ``nn.LeakyReLU`` with slope >= 0) directly after a BatchNorm
    in an ``nn.Sequential`` becomes the BatchNorm's fused activation and is replaced by ``nn.Identity``.
    With ``fuse=True``, the forward is traced with ``torch.fx`` and every ``BN -> act``,
    ``BN -> add -> act`` and ``BN -> add`` becomes one bnfused layer (act: relu, relu6, leaky_relu,
    hardswish, silu, sigmoid; see ``bnfused.fusion``); the result is then a ``torch.fx.GraphModule`` with the
    same submodules and state_dict keys. A model that cannot be traced gets the ``fuse_relu``
    conversion instead, with a warning naming why.
    With ``sync=True`` every BatchNorm then becomes a ``bnfused.SyncBatchNorm`` (statistics over all
    processes of the default group; see ``SyncBatchNorm.convert_sync_batchnorm``).
    With ``memory="inplace"``, every converted layer that can keeps only its output for backward
    (no activation or leaky_relu with slope > 0; ``bnfused.inplace``); the others
    keep their input as usual.
    Returns the model (converted in place), or the new module when ``model`` itself is a BatchNorm
    or was rewritten by the fusion pass.
    """
    if memory != "default":
        return _keep_outputs(convert_model(model, fuse_relu, backend, sync, fuse), memory)
    if fuse and type(model) not in EQUIVALENTS:
        return _convert_traced(model, backend, sync)
    if sync:
        return SyncBatchNorm.convert_sync_batchnorm(convert_model(model, fuse_relu, backend))
    if type(model) in EQUIVALENTS:
        return _convert_one(model, backend)
    swap_submodules(model, lambda m: _convert_one(m, backend) if type(m) in EQUIVALENTS else None)
    if fuse_relu:
        shared = _shared_modules(model)
        for seq in model.modules():
            if isinstance(seq, nn.Sequential):
                _fuse_following_relu(seq, shared)
    return model


def _shared_modules(model: nn.Module) -> set[int]:
    """The ids of the modules registered under more than one name in ``model``."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, m in model.named_modules(remove_duplicate=False):
        (shared if id(m) in seen else seen).add(id(m))
    return shared


def _keep_outputs(model: nn.Module, memory: str) -> nn.Module:
    """Sets ``memory`` on every bnfused layer (not SyncBatchNorm) whose activation allows it."""
    inplace.check_memory_mode(memory, act_codes.NONE, 0.0)  # the name itself
    for m in model.modules():
        if isinstance(m, _FusedBatchNorm) and not isinstance(m, SyncBatchNorm):
            try:
                inplace.check_memory_mode(memory, *act_codes.parse(m.activation, m.negative_slope))
            except ValueError:
                continue
            m.memory = memory
    return model


def _convert_traced(model: nn.Module, backend: str | None, sync: bool) -> nn.Module:
    """``convert_model(fuse=True)``: the fusion pass, then the layer swap."""
    reason = fusion.untraceable_reason(model)
    if reason is None:
        try:
            gm = fusion.trace(model)
        except fusion.Untraceable as exc:
            reason = str(exc)
        except Exception as exc:  # any tracing failure means: convert without the pass
            reason = f"torch.fx cannot trace it ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})"
    if reason is not None:
        warnings.warn(
            f"bnfused: convert_model(fuse=True) fuses only nn.Sequential BatchNorm -> ReLU pairs in "
            f"{type(model).__name__}: {reason}",
            RuntimeWarning,
            stacklevel=3,
        )
        return convert_model(model, fuse_relu=True, backend=backend, sync=sync)
    sites = fusion.find_sites(gm)
    if not sites:  # nothing to fuse: keep the model's own class
        return convert_model(model, backend=backend, sync=sync)
    if sync:  # SyncBatchNorm's kernels fuse relu and leaky_relu, and it takes no residual input
        sites = [s for s in sites if s.residual is None and s.code in act_codes.SPLIT_CODES]
    gm.training = model.training
    convert_model(gm, backend=backend, sync=sync)
    fusion.apply_sites(gm, sites)
    return gm


class ActivationHook:
    """Forward hook that passes a layer's output through an activation module.

    ``revert_model`` puts a fused activation here when the layer has no slot for a module of its
    own: the activation still runs, and the state_dict keys stay those of the bnfused model.
    """

    def __init__(self, activation: nn.Module) -> None:
        self.activation = activation

    def __call__(self, module: nn.Module, args: tuple, output):
        return self.activation(output)

    def __repr__(self) -> str:
        return f"ActivationHook({self.activation})"


_ACTIVATION_MODULES = {act_codes.RELU: nn.ReLU, act_codes.RELU6: nn.ReLU6, act_codes.HARDSWISH: nn.Hardswish,
                       act_codes.SILU: nn.SiLU, act_codes.SIGMOID: nn.Sigmoid}  # fmt: skip


def _activation_module(bn: _FusedBatchNorm) -> nn.Module | None:
    code, slope = act_codes.parse(bn.activation, bn.negative_slope)
    if code == act_codes.LEAKY_RELU:
        return nn.LeakyReLU(slope)
    return _ACTIVATION_MODULES[code]() if code in _ACTIVATION_MODULES else None


def _revert_one(bn: _FusedBatchNorm) -> tuple[nn.Module, nn.Module | None]:
    """(torch layer, its activation module or None)."""
    if getattr(bn, "takes_residual", False):
        raise ValueError(
            "bnfused: revert_model cannot undo a fused residual add (convert_model(fuse=True) rewrote the "
            "forward); revert the model as it was before fusing, or convert it with fuse_relu=True instead"
        )
    if isinstance(bn, SyncBatchNorm):
        torch_cls = nn.SyncBatchNorm
    else:  # the torch.nn class it subclasses (BatchNormReLU2d -> nn.BatchNorm2d)
        torch_cls = next(c for c in type(bn).__mro__ if c in EQUIVALENTS)
    new = _swap_class(bn, torch_cls)
    for name in _FUSED_ATTRIBUTES:
        new.__dict__.pop(name, None)
    return new, _activation_module(bn)


def revert_model(model: nn.Module) -> nn.Module:
    """The inverse of ``convert_model``: every bnfused BatchNorm becomes its ``torch.nn`` class.

    For tools that match torch's exact classes, such as ``torch.ao.quantization.fuse_modules`` /
    ``fuse_modules_qat`` (then ``prepare_qat``) and FX graph mode quantization (``prepare_qat_fx``,
    which fuses conv-bn-relu only for torch's classes). The very same
    Parameter and buffer objects are kept, with the train/eval flag and hooks; state_dict keys do
    not change. A fused activation comes back as a module: into the ``nn.Identity`` that follows the
    layer in an ``nn.Sequential`` (the slot ``convert_model(fuse_relu=True)`` leaves), else as an
    ``ActivationHook`` forward hook on the layer. ``bnfused.SyncBatchNorm`` becomes
    ``nn.SyncBatchNorm``.
    Returns the model (reverted in place), or the new module when ``model`` itself is a bnfused layer.
    """
    if isinstance(model, _FusedBatchNorm):
        new, activation = _revert_one(model)
        if activation is not None:
            new.register_forward_hook(ActivationHook(activation))
        return new
    _revert_children(model, {}, _shared_modules(model))
    return model


def _revert_children(model: nn.Module, reverted: dict[int, tuple], shared: set[int]) -> None:
    """Reverts the bnfused layers below ``model``; a shared one stays one module (as
    ``modules.swap_submodules`` keeps it), with its activation as a hook, which runs wherever it is called."""
    children = list(model._modules.items())
    for i, (name, child) in enumerate(children):
        if not isinstance(child, _FusedBatchNorm):
            if child is not None and id(child) not in reverted:
                reverted[id(child)] = (child, child)
                _revert_children(child, reverted, shared)
            continue
        if id(child) in reverted:
            model._modules[name] = reverted[id(child)][1]
            continue
        new, activation = _revert_one(child)
        following = children[i + 1] if i + 1 < len(children) else (None, None)
        in_slot = isinstance(model, nn.Sequential) and type(following[1]) is nn.Identity and id(child) not in shared
        if activation is not None and in_slot:
            model._modules[following[0]] = activation.train(child.training)
        elif activation is not None:
            new.register_forward_hook(ActivationHook(activation))
        model._modules[name] = new
        reverted[id(child)] = (child, new)
