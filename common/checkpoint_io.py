"""Reading checkpoint files without running pickled code: our own checkpoints and the authors' alike.

Authors' training checkpoints pickle objects of packages we do not depend on (an omegaconf `DictConfig`, a
Lightning callback, an `argparse.Namespace` of their flags). `read_checkpoint` unpickles with a restricted
unpickler: a global is resolved only if it is on torch's own `weights_only` allow-list (tensors, storages, dtypes,
containers), a numpy array/scalar rebuilder, or a plain-data class of the standard library. Every other class
becomes an inert stand-in (`Skipped`) that records its name and the state it was given; nothing of the original
class is imported or run. Tensors, containers, numbers, strings and numpy arrays come back as themselves.
"""
import _compat_pickle
import argparse
import collections
import os
import pickle
import types

import numpy as np
import torch


class Skipped:
    """Stand-in for a pickled object whose class is not imported: keeps its arguments, items and state only."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls cls.__new__(cls, *args)
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):  # BUILD
        self.state = state

    def __setitem__(self, key, value):  # SETITEMS of a dict subclass
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):  # APPENDS of a list subclass
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("values", []).extend(values)

    def __repr__(self):
        return f"<skipped {self.qualified_name}>"


def _safe_globals():
    """Qualified name -> object for every global the unpickler may resolve to the real thing."""
    from torch import _weights_only_unpickler
    safe = dict(_weights_only_unpickler._get_allowed_globals())  # what torch.load(weights_only=True) allows
    core = np._core if hasattr(np, "_core") else np.core
    for module in ("numpy.core", "numpy._core"):  # files written under numpy 1.x or 2.x
        safe[f"{module}.multiarray._reconstruct"] = core.multiarray._reconstruct
        safe[f"{module}.multiarray.scalar"] = core.multiarray.scalar
    safe["numpy.ndarray"], safe["numpy.dtype"] = np.ndarray, np.dtype
    for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"):
        dtype_class = type(np.dtype(name))
        safe[f"{dtype_class.__module__}.{dtype_class.__qualname__}"] = dtype_class
    for cls in (argparse.Namespace, collections.OrderedDict, collections.defaultdict, int, float, complex, bool, str,
                bytes, tuple, list, dict, set, frozenset, slice, range):
        safe[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return safe


class _RestrictedUnpickler(pickle.Unpickler):
    safe = None  # filled on first use
    skipped = None

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names of old files (e.g. __builtin__.long)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in self.safe:
            return self.safe[full]
        self.skipped.add(full)
        return type("Skipped", (Skipped,), {"qualified_name": full})


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint; the message is one line naming the file."""


def read_checkpoint(path):
    """(object, sorted names of the skipped classes) of a torch checkpoint file. No pickled code runs: classes
    outside torch's weights-only allow-list, numpy arrays and plain standard-library data become `Skipped`.
    CheckpointError (one line, naming the file) when it is missing, truncated or not a torch checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    skipped = set()
    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"safe": _safe_globals(), "skipped": skipped})
    # torch's legacy (pre-1.6) format also calls pickle_module.load for its headers: restricted too
    module = types.SimpleNamespace(Unpickler=unpickler, load=lambda f, **kw: unpickler(f, **kw).load(),
                                   __name__="restricted_pickle")
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, not a pickle, bad storage: all mean the same here
        text = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__
        raise CheckpointError(f"'{path}' is not a readable torch checkpoint ({reason}); it may be truncated or "
                              f"another kind of file: download or copy it again") from None
    return obj, sorted(skipped)


def strip_prefix(state_dict, prefix):
    """state_dict with `prefix` removed from every key that has it (DDP's 'module.')."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def plain_data(obj):
    """Containers of stand-ins -> plain Python data where the stand-in is a config node (omegaconf's DictConfig /
    ListConfig / ValueNode keep their values in `_content` / `_val`); other stand-ins stay as they are."""
    if isinstance(obj, dict):
        return {k: plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_data(v) for v in obj)
    state = obj.state if isinstance(obj, Skipped) else None
    if isinstance(state, dict) and "_content" in state:
        return plain_data(state["_content"])
    if isinstance(state, dict) and "_val" in state:
        return plain_data(state["_val"])
    return obj
