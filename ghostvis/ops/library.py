"""Glue between ``torch.library`` custom ops and autograd.

Kernels are registered as custom ops (one for the forward, one for the
backward, each with a fake impl for ``torch.compile``). ``register_autograd`` on
a custom op does not reach ``torch.func`` transforms, so the two are joined by a
``torch.autograd.Function`` in the functorch-ready form (a separate
``setup_context``), which works under ``.backward()``, ``torch.func.grad``,
``torch.compile(fullgraph=True)`` and activation checkpointing alike.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("ghostvis.ops")


def _overload(op):
    # dynamo traces a call to the op's OpOverload, not to the CustomOpDef wrapper
    return getattr(op, "_opoverload", op)


def differentiable(name: str, forward, setup_context, backward, non_differentiable=()):
    """A callable applying an autograd.Function (functorch-ready: separate ``setup_context``) over custom ops.

    ``non_differentiable`` lists output indices that are auxiliary (saved stats).
    """
    forward = _overload(forward)

    def fwd(*args):
        return forward(*args)

    def setup(ctx, inputs, output):
        if non_differentiable:
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
        setup_context(ctx, inputs, output)

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd), "setup_context": staticmethod(setup), "backward": staticmethod(backward)})

    def call(*args):
        # with nothing to differentiate, skip the Function (and its saved tensors) altogether
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return forward(*args)

    call.function = function
    return call


def backward_only(name: str, op):
    """A callable running a backward-kernel op so that ``torch.func`` may call it too.

    Inside ``torch.func.grad`` a backward pass runs on transform-wrapped tensors,
    where a bare custom op without autograd fails; as a Function its forward runs
    on plain tensors, and asking for a second derivative raises a clear error.
    Under ``torch.compile`` the op is called directly.
    """
    op = _overload(op)

    def fwd(*args):
        return op(*args)

    def setup(ctx, inputs, output):
        ctx.op_name = name

    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op_name}: double backward (a gradient of a gradient) is not supported")

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd), "setup_context": staticmethod(setup), "backward": staticmethod(backward)})

    def call(*args):
        # compiled graphs trace the op itself (dynamo does not nest Functions in a backward)
        return op(*args) if torch.compiler.is_compiling() else function.apply(*args)

    return call


def lower_as_fallbacks(namespace: str = "ghostvis") -> None:
    """Tell inductor, before it compiles, that every custom op of ``namespace`` runs as its own kernel.

    Inductor would otherwise register each op the first time its lowering meets it. In
    torch 2.11 that step formats the op's inputs into a log message even with logging off
    (later versions format it only when the message is logged), and an IR node prints its
    inputs recursively. In a training graph where every block's op reaches the previous
    block's along two paths (the residual stream and the branch, as with ``add_rms_norm``),
    that text doubles with each layer: a 20-layer step stalled lowering for minutes.
    Registered here first, with the layout constraint inductor's own registration picks (the
    op's tag, else the configured default, read now), the ops never take that path.
    Idempotent. An op that cannot be registered is logged and left to inductor.
    """
    try:
        from torch._inductor import lowering as L
    except Exception as e:  # no inductor: nothing to register
        log.warning("inductor is not importable, %s ops not registered with it: %s", namespace, e)
        return
    ns = getattr(torch.ops, namespace)
    for name in dir(ns):
        packet = getattr(ns, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if op in L.lowerings:  # registered already (here, or by inductor itself)
                continue
            try:
                tag = L.get_layout_constraint_tag(op, with_default=True)
                L.make_fallback(op, layout_constraint=L.tag_to_layout_constraint(tag), warn=False)
            except Exception as e:  # private API: compiling still works, only the deep-graph stall may return
                log.warning("could not register %s with inductor ahead of compiling: %s", op, e)
