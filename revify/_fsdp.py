"""Detect FSDP2 (``torch.distributed.fsdp.fully_shard``) inside a converted model.

NOTE [ FSDP2 ]
``fully_shard(module)`` makes ``module`` an ``FSDPModule``: its pre-forward hook all-gathers
its parameters and puts the unsharded tensors into the modules' parameter slots, its
post-forward hook puts the sharded DTensors back (``reshard_after_forward``), and gradients
reach the sharded parameters only through the unsharded ones, by its post-backward hook. A
revify stage or segment recomputes its units in backward by calling their modules' forwards
directly, without the hooks of a block sharded on its own; it then reads the sharded DTensors
or other tensors than the forward read, and its parameters' gradients would be lost
(``grad=None``) or the recompute fails. So revify refuses ``fully_shard`` on any module below
a converted module. ``fully_shard`` on the converted module itself (or on a module above it)
is supported: the root's hooks unshard every parameter before the converted forward and keep
them unsharded until its post-backward hook, after the recompute, reduce-scatters the
gradients the stages handed to the unsharded parameters. The tracing of ``convert`` cannot run
on sharded parameters, so ``convert`` comes before ``fully_shard``.
"""

from __future__ import annotations

import sys

from torch import nn

_FIX = (
    "convert first, then fully_shard only the converted model (or a module above it), not "
    "its blocks: model = revify.convert(model); fully_shard(model); or use "
    "DistributedDataParallel (docs/distributed.md)"
)


def _fsdp_module_type() -> type | None:
    """``FSDPModule`` if FSDP2 was imported (nothing to find otherwise; costs no import)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FSDPModule", None) if fsdp is not None else None


def sharded_modules(model: nn.Module, include_self: bool) -> list[str]:
    """Paths of the ``fully_shard``-ed modules in ``model`` (``model`` itself as its class
    name, and only if ``include_self``)."""
    kind = _fsdp_module_type()
    if kind is None:
        return []
    return [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, kind) and (include_self or m is not model)
    ]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def check_before_convert(model: nn.Module) -> None:
    """Refuse to convert a model on which ``fully_shard`` already ran (NOTE [ FSDP2 ])."""
    names = sharded_modules(model, include_self=True)
    if names:
        from .convert import ConversionError

        raise ConversionError(
            f"revify.convert: {_listed(names)} {'is' if len(names) == 1 else 'are'} already "
            f"sharded by FSDP (fully_shard); revify cannot trace sharded parameters; {_FIX}"
        )


def check_at_forward(model: nn.Module) -> None:
    """Refuse to run a converted ``model`` with a ``fully_shard``-ed module below it: its
    recompute would bypass that module's FSDP hooks (NOTE [ FSDP2 ])."""
    names = sharded_modules(model, include_self=False)
    if names:
        raise RuntimeError(
            f"revify: {_listed(names)} in the converted {type(model).__name__} "
            f"{'is' if len(names) == 1 else 'are'} sharded by FSDP (fully_shard) on "
            f"{'its' if len(names) == 1 else 'their'} own; revify's recompute in backward "
            "would bypass FSDP's unshard hooks and the parameters would get no gradient; "
            + _FIX
        )
