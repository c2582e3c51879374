"""The module ``convert_model(fuse=True)`` returns: a ``torch.fx.GraphModule`` whose forward reaches
its submodules through ``_modules`` dictionaries.

fx writes a call of ``features.1.block.0`` as ``getattr(getattr(self.features, "1").block, "0")(x)``.
Every step of that chain is an attribute lookup that fails on the class and the instance before
``nn.Module.__getattr__`` finds the submodule, about 0.3 µs each: on a MobileNetV3-small at batch 2
(CPU, one thread) fx's forward took 14% longer than the model it was traced from. The same forward
written with ``_modules`` lookups (``submodule_at``) took 6% less than the original (no calls of the
containers). So the module keeps fx's code as its ``code`` (what it prints, and what TorchScript and
pickling read) and runs an equivalent forward that differs only in those lookups, on each call's own
line. The lookups stay dynamic: a submodule replaced later (``setattr(model.classifier, "3", head)``)
is the one called, and a container wrapped later (``torch.compile`` of a block) is looked into as fx's
code would.
"""

from __future__ import annotations

import copy
import re
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
    (fx.GraphModule keeps only those: state_dict keys would change), in ``model``'s order."""
    for name, module in model.named_modules(remove_duplicate=False):  # a module kept under two names too
        if not name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        try:
            gm.get_submodule(name)
        except AttributeError:
            gm.get_submodule(parent_name)._modules[leaf] = module
    # The root, and each container fx made in place of a module traced through, holds only the
    # tensors the forward reads, in the order the forward first uses them: the others are added, and
    # all put in the order ``model`` registered them, which ``parameters()`` follows (an optimizer's
    # state_dict and ``parameters_to_vector`` index by it).
    for name, original in model.named_modules(remove_duplicate=False):
        held = gm.get_submodule(name) if name else gm
        if held is original:
            continue
        held.training = original.training  # fx's containers are new modules, in training mode
        own = [*original.named_parameters(recurse=False, remove_duplicate=False),
               *original.named_buffers(recurse=False, remove_duplicate=False)]  # fmt: skip
        for key, tensor in own:
            if key not in held._parameters and key not in held._buffers:
                if isinstance(tensor, nn.Parameter):
                    held.register_parameter(key, tensor)
                else:
                    held.register_buffer(key, tensor, persistent=key not in original._non_persistent_buffers_set)
        for attribute in ("_modules", "_parameters", "_buffers"):
            mine, theirs = getattr(held, attribute), getattr(original, attribute)
            ordered = {key: mine[key] for key in [*theirs, *mine] if key in mine}
            mine.clear()
            mine.update(ordered)


def submodule_at(module: nn.Module, path: tuple[str, ...]) -> nn.Module:
    """``module``'s submodule at ``path``, found in ``_modules`` where it is registered, else through
    ``getattr`` (a wrapper that forwards attribute lookups, as ``torch.compile``'s and activation
    checkpointing's do, and fx's errors for a missing one)."""
    for name in path:
        found = module._modules.get(name)
        module = found if found is not None else getattr(module, name)
    return module


_LOOKUP = "_bnfused_submodule_at"


def _direct_forward(gm: fx.GraphModule, src: str, globals_: dict) -> Callable | None:
    """fx's forward ``src`` with each submodule call's ``getattr`` chain, on the call's own line,
    written as a ``submodule_at`` lookup; None where a line is not as expected (the forward then
    stays fx's)."""
    if _format_target is None or _forward_from_src is None:
        return None
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        written = re.escape(_format_target("self", node.target))
        line = re.compile(rf"^(\s*{re.escape(node.name)}\b[^=\n]*= ){written}\(", re.MULTILINE)
        lookup = f"{_LOOKUP}(self, {tuple(node.target.split('.'))!r})("
        src, found = line.subn(lambda match, lookup=lookup: match.group(1) + lookup, src, count=1)
        if found != 1:
            return None
    forward = _forward_from_src(src, {**globals_, _LOOKUP: submodule_at}, getattr(gm.graph, "_co_fields", None) or {})
    forward.__wrapped__ = type(gm).forward  # fx's: where TorchScript and inspect read the source
    return forward


class FusedGraphModule(fx.GraphModule):
    """A ``torch.fx.GraphModule`` whose forward looks its submodules up in ``_modules`` (see the
    module's docstring); ``code`` and TorchScript are fx's, copies and pickles stay this class."""

    def recompile(self):
        python_code = super().recompile()
        if self._code == python_code.src:  # fx's profiler-metadata mode rewrites the code: keep fx's
            forward = _direct_forward(self, python_code.src, python_code.globals)
            if forward is not None:
                type(self).forward = forward
        return python_code

    def __copy__(self) -> FusedGraphModule:
        """As fx's copy (the same submodules and graph), with every submodule and this forward kept:
        ``copy.copy`` and DataParallel's replicas."""
        twin = fused_graph_module(self, self.graph)
        twin.meta = getattr(self, "meta", {})
        return twin

    def __deepcopy__(self, memo) -> FusedGraphModule:
        twin = super().__deepcopy__(memo)
        _restore_aliases(twin, {a: copy.deepcopy(getattr(self, a), memo) for a in _REGISTRIES})
        _restore_modes(twin, self)
        return twin

    def __reduce__(self):
        rebuild, args = super().__reduce__()[:2]
        return (_unpickled, (rebuild, args))


# fx rebuilds a copied or unpickled GraphModule from the root's named_children(), named_parameters() and
# named_buffers(), which list an object registered under two names (a layer shared by two branches) once:
# the other names are put back from the registries they were copied with.
_REGISTRIES = ("_modules", "_parameters", "_buffers")


def _restore_aliases(gm: nn.Module, registries: dict[str, dict]) -> None:
    for attribute, theirs in registries.items():
        mine = getattr(gm, attribute)
        ordered = {key: mine[key] if key in mine else value for key, value in theirs.items()}
        ordered.update((key, value) for key, value in mine.items() if key not in ordered)
        mine.clear()
        mine.update(ordered)


def _restore_modes(gm: nn.Module, source: nn.Module) -> None:
    """Each module of ``gm`` in the mode (``training``) of ``source``'s module of the same name: fx rebuilds
    the containers of a copied or unpickled GraphModule as new modules, in training mode."""
    for name, module in source.named_modules(remove_duplicate=False):
        (gm.get_submodule(name) if name else gm).training = module.training


def _unpickled(rebuild: Callable, args: tuple) -> FusedGraphModule:
    """A pickled FusedGraphModule: fx rebuilds a GraphModule from its code, which becomes this class again."""
    gm = rebuild(*args)
    body = args[0]
    _restore_aliases(gm, {a: body[a] for a in _REGISTRIES if isinstance(body.get(a), dict)})
    fused = fused_graph_module(gm, gm.graph)
    if isinstance(body.get("_modules"), dict):  # the pickled containers, with their modes
        pickled = nn.Module()
        pickled._modules.update(body["_modules"])
        pickled.training = body.get("training", gm.training)
        _restore_modes(fused, pickled)
    return fused


def fused_graph_module(root: nn.Module, graph: fx.Graph) -> FusedGraphModule:
    """A FusedGraphModule of ``graph`` named after ``root``'s class, holding every submodule, parameter and
    buffer of ``root`` under its name."""
    gm = FusedGraphModule(root, graph, class_name=type(root).__name__)
    hold_everything(gm, root)
    return gm
