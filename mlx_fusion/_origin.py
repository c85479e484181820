"""The module passed to `fuse`: what changed on its top level since the last call.

`fuse(module)` returns a copy of the module's top level that shares its children
and arrays (`_fused_module`); each fused call first takes over here what was
changed on the original's top level (``model.weight = w2``, ``model.scale = 3``,
``del model.flag``), so both objects run the same code and parameters.
"""

from __future__ import annotations

from operator import is_

import mlx.core as mx
import mlx.nn as nn

__all__ = ["Origin"]


class Origin:
    """The module passed to `fuse`: what changed on its top level since the last call.

    An array replaced by another array with the same shape, dtype and values is no
    change: ``nn.value_and_grad(model, ...)`` leaves such copies on the original, and
    taking them over inside ``nn.value_and_grad(fused, ...)`` would replace the fused
    object's tracers (the gradient of that parameter would read 0).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._snap()

    def _snap(self):
        m = self.module
        self.items, self.attrs = dict(dict.items(m)), dict(m.__dict__)
        self.values, self.attr_values = tuple(dict.values(m)), tuple(m.__dict__.values())
        # live views of both dicts, kept: every call compares them with the snapshot
        self.attr_dict, self.views = m.__dict__, (dict.values(m), m.__dict__.values())
        self.sizes = (len(self.values), len(self.attr_values))

    def pull(self, fused: nn.Module) -> bool:
        """Take over what changed on the original's top level; whether anything had."""
        m, (items, attrs) = self.module, self.views
        if (m.__dict__ is self.attr_dict and (len(items), len(attrs)) == self.sizes
                and all(map(is_, items, self.values)) and all(map(is_, attrs, self.attr_values))):
            return False
        changed = False
        for k in self.items:
            if k not in m and dict.pop(fused, k, self) is not self:
                changed = True
        for k, v in dict.items(m):
            if _changed(self.items.get(k, self), v):
                dict.__setitem__(fused, k, v)
                changed = True
        for k in self.attrs:  # `del model.flag` on the original
            if k not in m.__dict__ and k not in _OWN_ATTRS and fused.__dict__.pop(k, self) is not self:
                changed = True
        for k, v in m.__dict__.items():
            if k not in _OWN_ATTRS and _changed(self.attrs.get(k, self), v):
                fused.__dict__[k] = v
                changed = True
        self._snap()
        return changed


_OWN_ATTRS = ("_fusion", "_no_grad")  # the fused object's own: never taken over


def _changed(old, new) -> bool:
    if old is new:
        return False
    if type(old) is mx.array and type(new) is mx.array and old.shape == new.shape and old.dtype == new.dtype:
        try:
            return not mx.array_equal(old, new).item()
        except Exception:  # arrays of a transformation in progress: take the new one
            return True
    return True
