"""What autograd allows now: an in-place write to a tensor (asked before anything is written), and
whether a forward runs again inside a backward pass (activation checkpointing)."""

from __future__ import annotations

import torch

from .ops import in_place_problem


def in_place_refusal(name: str, tensor: torch.Tensor):
    """Why writing ``tensor`` in place would fail, now or in the backward pass (None when it
    would not): torch's refusals (``ops.in_place_problem``), or a tensor autograd saved."""
    problem = in_place_problem(name, tensor)
    if problem is not None:
        return problem
    producer = saved_for_backward_by(tensor)
    if producer is not None:
        return (f"{name} was saved by autograd for the backward of {producer} (the output of a ReLU, sigmoid, "
                f"tanh, ...): writing it in place would make the backward pass fail")
    return None


def saved_for_backward_by(tensor: torch.Tensor):
    """The name of the autograd node that produced ``tensor`` (or its base) and saved it for its
    backward, which an in-place write would break; None when there is none or grad is off.
    (Not checked under torch.compile, which cannot trace the inspection of autograd nodes; there
    the compiler raises autograd's own error.)"""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and tensor.requires_grad):
        return None
    for t in (tensor, tensor._base):
        node = getattr(t, "grad_fn", None)
        if node is None:
            continue
        assert t is not None  # None has no grad_fn
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                saved = getattr(node, name)
            except RuntimeError:  # already freed, or not a tensor the node can give back
                continue
            if isinstance(saved, torch.Tensor) and saved.data_ptr() == t.data_ptr() and saved.shape == t.shape:
                return type(node).__name__
    return None


def recomputing_in_backward() -> bool:
    """Whether the code runs inside a backward pass: where ``torch.utils.checkpoint`` runs a
    checkpointed forward again (either flavour), and a forward's updates of running state would
    count a batch twice. Not asked while torch.compile traces: a compiled graph inside an eager
    checkpoint is replayed whole, so this check cannot stop it there."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
