"""What the estimators fitted on the training labels (LDS, DenseWeight) share: a fit that
replaces the previous one whole, a table derived from it and kept on each device it is asked
for, and a state dict of the fit with the settings it was made with, loaded only once every
value in it has been checked."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

from . import _validate as validate
from ._types import ArrayLike

Estimator = TypeVar("Estimator", bound="FittedEstimator")  # fit() returns the estimator it was called on


class FittedEstimator:
    """A fit (``None`` before :meth:`fit`) and the per-device tables derived from it.

    A subclass names its settings in ``_SETTINGS`` and implements ``_fit_labels(labels)`` (the
    fit of the training labels, checked), ``_table()`` (the CPU table its per-sample values
    are read from), ``_fit_state()`` and ``_fit_from_state(state, fitted)`` (the fit as state
    dict entries, and back, checked: ValueError naming the key at fault; None when not fitted),
    and ``weights(labels)``.
    """

    _SETTINGS: tuple = ()
    _fit: Any  # the subclass's fit (a tensor for LDS, a dict for DenseWeight); None before fit()
    _tables_on: dict[Any, torch.Tensor]  # device -> the table there
    # The subclass's hooks (see above), declared for type checkers.
    _fit_labels: Callable[[Any], Any]
    _table: Callable[[], torch.Tensor]
    _fit_state: Callable[[], dict]
    _fit_from_state: Callable[[Mapping[str, Any], bool], Any]
    weights: Callable[[ArrayLike], torch.Tensor]

    def __init__(self) -> None:
        self._fit = None
        self._tables_on = {}  # device -> the table there, so no call copies it from the host again

    def fit(self: Estimator, labels: ArrayLike) -> Estimator:
        """Fit ``labels`` (the whole training set; any shape) from scratch; returns ``self``.
        A failed fit leaves the previous one as it was."""
        self._set_fit(self._fit_labels(labels))
        return self

    def _fit_weights(self, labels: ArrayLike, **options: Any) -> torch.Tensor | np.ndarray:
        """Fit ``labels`` and give their weights (the one-call functions): a tensor for a tensor,
        else a NumPy array; ``options`` go to :meth:`_fitted_weights`."""
        tensor = validate.real_tensor("labels", labels)
        weights = self.fit(tensor)._fitted_weights(tensor, **options)
        return weights if isinstance(labels, torch.Tensor) else weights.numpy()

    def _fitted_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """The weights of the labels just fitted (a subclass may scale them as its published code
        does)."""
        return self.weights(labels)

    def _set_fit(self, fit) -> None:
        self._fit, self._tables_on = fit, {}

    def _require_fit(self, what: str):
        if self._fit is None:
            raise RuntimeError(f"{type(self).__name__}.{what}() needs a fit: call fit(train_labels) first "
                               "(or load_state_dict)")
        return self._fit

    def _table_on(self, device) -> torch.Tensor:
        table = self._tables_on.get(device)
        if table is None:
            table = self._tables_on[device] = self._table().to(device)
        return table

    def state_dict(self) -> dict:
        """The fit and the settings it was made with."""
        state = {key: getattr(self, key) for key in self._SETTINGS}
        state["fitted"] = self._fit is not None
        state.update(self._fit_state())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a fit saved by :meth:`state_dict`; its settings must be this object's. Every
        value is checked before anything changes: a failed load leaves the object as it was."""
        owner = type(self).__name__
        validate.state_mapping(state, owner)
        for key in self._SETTINGS:
            if key in state and _differs(state[key], getattr(self, key)):
                raise ValueError(f"state_dict {key!r} is {state[key]!r}, this {owner} has {getattr(self, key)!r}")
        fitted = state.get("fitted", True)
        if not isinstance(fitted, (bool, np.bool_)):
            raise ValueError(f"state_dict 'fitted' must be a bool, got {fitted!r}")
        self._set_fit(self._fit_from_state(state, bool(fitted)))


def _differs(saved, setting) -> bool:
    """Whether a saved setting is not this one's: a list and a tuple of equal values are equal
    (a JSON or YAML round trip turns tuples into lists), as a NumPy scalar and its number."""
    if isinstance(saved, (list, tuple)) and isinstance(setting, (list, tuple)):
        return len(saved) != len(setting) or any(map(_differs, saved, setting))
    try:
        return bool(saved != setting)
    except (TypeError, ValueError, RuntimeError):  # a tensor or an array saved in its place
        return True
