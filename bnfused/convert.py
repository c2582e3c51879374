"""``convert_model``: swap the BatchNorm layers of an existing model for bnfused's."""

from __future__ import annotations

from torch import nn

from bnfused.modules import EQUIVALENTS, _FusedBatchNorm
from bnfused.sync import SyncBatchNorm


def _convert_one(bn: nn.Module, backend: str | None) -> nn.Module:
    cls = EQUIVALENTS[type(bn)]
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        # Its hooks are bound to the old object: build a fresh lazy module with the same settings.
        template = bn.weight if bn.affine else bn.running_mean
        kwargs = {"device": template.device, "dtype": template.dtype} if template is not None else {}
        if bn.affine and bn.bias is None:
            kwargs["bias"] = False  # torch's bias=False (torch >= 2.10)
        new = cls(bn.eps, bn.momentum, bn.affine, bn.track_running_stats, backend=backend, **kwargs)
        return new.train(bn.training)
    new = cls.__new__(cls)
    # The same Parameter and buffer objects, hooks and train/eval flag: optimizers keep working. The
    # registries are copied, so the old module and the new one don't share later changes.
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in bn.__dict__.items()})
    new._init_fused(None, 0.01, backend)
    return new


def _fuse_following_relu(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        bn, nxt = seq._modules[first], seq._modules[second]
        if not isinstance(bn, _FusedBatchNorm) or bn.activation is not None:
            continue
        if type(nxt) is nn.ReLU:
            bn.activation = "relu"
        elif type(nxt) is nn.LeakyReLU and nxt.negative_slope >= 0:
            bn.activation, bn.negative_slope = "leaky_relu", nxt.negative_slope
        else:
            continue
        seq._modules[second] = nn.Identity()  # keeps the indices (and state_dict keys) of what follows


def convert_model(
    model: nn.Module, fuse_relu: bool = False, backend: str | None = None, sync: bool = False
) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` (and lazy variant) in ``model`` with bnfused's.

    Parameters, buffers, device, dtype and train/eval state are kept (the very same tensors). With
    ``fuse_relu=True``, an ``nn.ReLU`` (or ``nn.LeakyReLU`` with slope >= 0) directly after a BatchNorm
    in an ``nn.Sequential`` becomes the BatchNorm's fused activation and is replaced by ``nn.Identity``.
    With ``sync=True`` every BatchNorm then becomes a ``bnfused.SyncBatchNorm`` (statistics over all
    processes of the default group; see ``SyncBatchNorm.convert_sync_batchnorm``).
    Returns the model (converted in place), or the new module when ``model`` itself is a BatchNorm.
    """
    if sync:
        return SyncBatchNorm.convert_sync_batchnorm(convert_model(model, fuse_relu, backend))
    if type(model) in EQUIVALENTS:
        return _convert_one(model, backend)
    for name, child in model.named_children():
        if type(child) in EQUIVALENTS:
            model._modules[name] = _convert_one(child, backend)
        else:
            convert_model(child, fuse_relu, backend)
    if fuse_relu and isinstance(model, nn.Sequential):
        _fuse_following_relu(model)
    return model
