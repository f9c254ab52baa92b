"""The types of the public signatures' arguments, named once (annotations for readers and type
checkers: the functions check their arguments themselves, with dirfast._validate)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

if TYPE_CHECKING:  # the stubs always have it
    from torch.distributed import ProcessGroup
else:
    try:
        from torch.distributed import ProcessGroup
    except ImportError:  # a torch built without distributed support
        ProcessGroup = Any

__all__ = ["ArrayLike", "NotTensor", "ProcessGroup"]

#: ArrayLike less a tensor: labels for which the per-sample weight functions return a NumPy array
#: (they return a tensor for a tensor; overloads say so to type checkers).
NotTensor = Union[np.ndarray, Sequence[Any], float, np.number]

#: Values read as a tensor (labels, predictions, tables): a tensor, a NumPy array, a (nested)
#: sequence of numbers, or one number (a 0-d tensor).
ArrayLike = Union[torch.Tensor, NotTensor]
