"""The module ``convert_model(fuse=True)`` returns: a ``torch.fx.GraphModule`` whose forward reaches
its submodules through ``_modules`` dictionaries.

fx writes a call of ``features.1.block.0`` as ``getattr(getattr(self.features, "1").block, "0")(x)``.
Every step of that chain is an attribute lookup that fails on the class and the instance before
``nn.Module.__getattr__`` finds the submodule, about 0.3 µs each: on a MobileNetV3-small at batch 2
(CPU, one thread) fx's forward took 14% longer than the model it was traced from. The same forward
written with ``self._modules['features']._modules['1']...`` took 6% less than the original (no calls of
the containers). So the module keeps fx's code as its ``code`` (what it prints, pickles and scripts
from) and runs an equivalent forward that differs only in those lookups. The lookups stay dynamic: a
submodule replaced later (``setattr(model.classifier, "3", head)``) is the one called.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch.fx as fx
from torch import nn

try:  # private helpers of torch.fx: without them the forward stays fx's own
    from torch.fx.graph import _format_target
    from torch.fx.graph_module import _forward_from_src
except ImportError:  # pragma: no cover - every torch from 2.6 to 2.15 has both
    _format_target = _forward_from_src = None


def hold_everything(gm: fx.GraphModule, model: nn.Module) -> None:
    """Adds to ``gm`` every submodule, parameter and buffer of ``model`` that its graph does not use
    (fx.GraphModule keeps only those: state_dict keys would change)."""
    for name, module in model.named_modules():
        if not name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        try:
            gm.get_submodule(name)
        except AttributeError:
            gm.get_submodule(parent_name)._modules[leaf] = module
    for name, tensor in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]:
        if name not in gm._parameters and name not in gm._buffers:
            if isinstance(tensor, nn.Parameter):
                gm.register_parameter(name, tensor)
            else:
                gm.register_buffer(name, tensor, persistent=name not in model._non_persistent_buffers_set)


def _direct_forward(gm: fx.GraphModule, src: str, globals_: dict) -> Callable | None:
    """fx's forward ``src`` with each submodule call's ``getattr`` chain written as ``_modules``
    lookups; None where a call is not written as expected (the forward then stays fx's)."""
    if _format_target is None or _forward_from_src is None:
        return None
    targets = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    for target in sorted(targets, key=len, reverse=True):
        written = f" = {_format_target('self', target)}("
        if written not in src:
            return None
        direct = "self" + "".join(f"._modules[{part!r}]" for part in target.split("."))
        src = src.replace(written, f" = {direct}(")
    return _forward_from_src(src, globals_, getattr(gm.graph, "_co_fields", None) or {})


class FusedGraphModule(fx.GraphModule):
    """A ``torch.fx.GraphModule`` whose forward looks its submodules up in ``_modules`` (see the
    module's docstring); ``code``, pickling, deep copies and TorchScript are fx's."""

    def recompile(self):
        python_code = super().recompile()
        if self._code == python_code.src:  # fx's profiler-metadata mode rewrites the code: keep fx's
            forward = _direct_forward(self, python_code.src, python_code.globals)
            if forward is not None:
                type(self).forward = forward
        return python_code

    def __prepare_scriptable__(self) -> fx.GraphModule:
        """TorchScript has no ``_modules``: it compiles a plain GraphModule of the same graph, holding
        the same submodules."""
        twin = fx.GraphModule(self, copy.deepcopy(self.graph), class_name=type(self).__name__)
        hold_everything(twin, self)
        return twin
