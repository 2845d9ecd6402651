"""Glue between ``torch.library`` custom ops and autograd.

Kernels are registered as custom ops (one for the forward, one for the
backward, each with a fake impl for ``torch.compile``). ``register_autograd`` on
a custom op does not reach ``torch.func`` transforms, so the two are joined by a
``torch.autograd.Function`` in the functorch-ready form (a separate
``setup_context``), which works under ``.backward()``, ``torch.func.grad``,
``torch.compile(fullgraph=True)`` and activation checkpointing alike.
"""

from __future__ import annotations

import torch


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
