"""Reading TorchScript archives (torch.jit.save, torch.jit.script(...).save) without loading or running them.

A TorchScript archive is a zip like torch.save's: ``<archive>/data.pkl`` pickles the module tree
(one ``__torch__.*`` object per module, its attributes set by BUILD from a dict), tensors point at
``<archive>/data/<key>`` records, and ``code/`` holds the modules' TorchScript source. Nothing
here calls ``torch.jit.load`` or reads ``code/``: a restricted unpickler builds inert placeholders
for the ``__torch__.*`` classes, accepts the few functions torch's C++ pickler writes
(:data:`ALLOWED_GLOBALS`) and refuses any other global by name. Every size the pickle claims is
checked against the zip record it points at (``torch_file.data_records``) before the file is
memory-mapped, so tensors are read on demand like a torch file's.

Which tensors are the state dict: torch lays out a module's attributes as its parameters, its
buffers, ``training``, its other attributes, then its submodules, so a module's tensors before its
``training`` entry are its parameters and buffers, in ``state_dict()`` order, and the keys are
their dotted attribute paths. A scripted module's ``state_dict()`` has the same keys in the same
order (non-persistent buffers included, as TorchScript keeps no persistence flag).
"""

from __future__ import annotations

import io
import mmap
import pickle
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from wcond.checkpoint.base import Checkpoint, tensor_info
from wcond.checkpoint.state_dict import MAX_NESTING
from wcond.checkpoint.torch_file import LOAD_ERRORS, DataRecord, data_records
from wcond.errors import CheckpointError, UnsafeCheckpointError, show_key, show_path

__all__ = ["ALLOWED_GLOBALS", "MAX_PICKLE_BYTES", "TorchScriptCheckpoint"]

KIND = "TorchScript archive"

# data.pkl is read whole into memory: a module tree's pickle is small (a few MB for a large model).
MAX_PICKLE_BYTES = 64 << 20
# Attributes visited while walking the module tree: bounds a forged pickle whose objects share
# children so that its paths multiply (a memo reference costs the pickle two bytes).
MAX_ATTRIBUTES = 1_000_000
# Distinct ``__torch__`` classes: each placeholder is a Python class (about a kilobyte), so a
# forged pickle naming millions of them would cost gigabytes. A model has a few hundred.
MAX_CLASSES = 65_536

# The storage classes torch's C++ pickler names ("torch FloatStorage", ...), from the dtype's
# C++ name; dtypes this torch lacks are left out and refused like any unknown global.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    f"{name}Storage": getattr(torch, attr)
    for name, attr in (
        ("Double", "float64"),
        ("Float", "float32"),
        ("Half", "float16"),
        ("BFloat16", "bfloat16"),
        ("Long", "int64"),
        ("Int", "int32"),
        ("Short", "int16"),
        ("Char", "int8"),
        ("Byte", "uint8"),
        ("Bool", "bool"),
        ("ComplexDouble", "complex128"),
        ("ComplexFloat", "complex64"),
        ("ComplexHalf", "complex32"),
        ("UInt16", "uint16"),
        ("UInt32", "uint32"),
        ("UInt64", "uint64"),
        ("Float8_e4m3fn", "float8_e4m3fn"),
        ("Float8_e5m2", "float8_e5m2"),
        ("Float8_e4m3fnuz", "float8_e4m3fnuz"),
        ("Float8_e5m2fnuz", "float8_e5m2fnuz"),
    )
    if hasattr(torch, attr)
}

# Tensors TorchScript can store in forms wcond does not rebuild: refused as unsupported, not unsafe.
_UNSUPPORTED = {
    ("torch._utils", "_rebuild_qtensor"): "a quantized tensor",
    ("torch._utils", "_rebuild_sparse_tensor"): "a sparse tensor",
    ("torch.jit._pickle", "build_tensor_from_id"): "a tensor from a tensor table",
}


class _Inert:
    """An object the pickle made; BUILD on it (or on the allowed functions) is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD applied to a storage, a tensor or a function")


class _StorageType(_Inert):
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage(_Inert):
    __slots__ = ("dtype", "key", "numel", "record")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, record: DataRecord):
        self.key, self.dtype, self.numel, self.record = key, dtype, numel, record


class _TensorSpec(_Inert):
    """A tensor as the pickle describes it; mapped from the file only when read."""

    __slots__ = ("offset", "size", "storage", "stride")

    def __init__(
        self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Call(_Inert):
    """An allowed global: calls ``fn``; the pickle cannot change it."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class ScriptObject:
    """A placeholder for a ``__torch__.*`` object (a module): its class name and its attributes, nothing run."""

    qualname = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> ScriptObject:
        obj = super().__new__(cls)
        obj.attrs = {}
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.attrs: dict[Any, Any]
        self.state: Any

    def __setstate__(self, state: Any) -> None:
        # A module's state is the dict of its attributes; a custom __getstate__'s is anything.
        if isinstance(state, dict):
            self.attrs = state
        else:
            self.state = state


def _list(data: Any) -> Any:
    return data


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    return value


# What data.pkl may name besides ``__torch__.*`` classes, ``torch.<dtype>Storage`` and
# ``torch._utils._rebuild_tensor_v2`` (checked by the unpickler itself).
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _list,
    ("torch.jit._pickle", "build_tensorlist"): _list,
    ("torch.jit._pickle", "build_doublelist"): _list,
    ("torch.jit._pickle", "build_boollist"): _list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("torch", "device"): str,  # a module's torch.device attribute: its name is enough
    ("builtins", "complex"): complex,
}


class TorchScriptCheckpoint(Checkpoint):
    """A TorchScript archive: the parameters and buffers of its module tree, by dotted attribute path.

    The file is memory-mapped while tensors are read; :meth:`release` unmaps it.
    """

    format = "torchscript"

    def __init__(self, path: Path, specs: dict[str, _TensorSpec]):
        self.path = path
        self._specs = specs
        self._tensors: dict[str, torch.Tensor] | None = None
        tensors = self._map()
        super().__init__(path, [path], {k: tensor_info(t) for k, t in tensors.items()})

    @classmethod
    def probe(cls, path: Path, head: bytes = b"", size: int = 0) -> bool:
        """A zip archive whose directory has ``constants.pkl`` beside ``data.pkl`` (torch's own test)."""
        if head[:4] != b"PK\x03\x04":
            return False
        try:
            with zipfile.ZipFile(path) as z:
                return _archive_prefix(z.namelist()) is not None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
            return False  # left to the torch reader, which names the damage

    @classmethod
    def open(cls, path: Path) -> TorchScriptCheckpoint:
        with _translated(path):
            return cls(path, _read_specs(path))

    def get(self, key: str) -> torch.Tensor:
        self._check_key(key)
        with _translated(self.path):
            return self._map()[key]

    def release(self) -> None:
        self._tensors = None

    def _map(self) -> dict[str, torch.Tensor]:
        """Every tensor as a view of one private mapping of the file (pages read on access)."""
        if self._tensors is None:
            with open(self.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            base = torch.frombuffer(mm, dtype=torch.uint8).untyped_storage()
            tensors = {}
            for key, spec in self._specs.items():
                st = spec.storage
                nbytes = st.numel * st.dtype.itemsize
                storage = base[st.record.offset : st.record.offset + nbytes]
                t = torch.empty(0, dtype=st.dtype)
                tensors[key] = t.set_(storage, spec.offset, spec.size, spec.stride)
            self._tensors = tensors
        return self._tensors


def _archive_prefix(names: list[str]) -> str | None:
    """The archive's top directory when it holds ``constants.pkl`` and ``data.pkl``, else None."""
    records = set(names)
    for name in names:
        prefix, sep, rest = name.partition("/")
        if sep and rest == "constants.pkl" and f"{prefix}/data.pkl" in records:
            return prefix
    return None


def _read_specs(path: Path) -> dict[str, _TensorSpec]:
    """The state dict's tensors as data.pkl describes them, every claim checked against the zip."""
    records = {r.name: r for r in data_records(path, KIND)}
    with zipfile.ZipFile(path) as z:
        prefix = _archive_prefix(z.namelist())
        if prefix is None:
            raise CheckpointError(
                f"{show_path(path)}: not a TorchScript archive: no constants.pkl beside data.pkl"
            )
        byteorder = _small_record(z, f"{prefix}/byteorder")
        if byteorder is not None and byteorder.strip() != sys.byteorder.encode():
            raise CheckpointError(
                f"{show_path(path)}: {KIND} stored {show_key(byteorder.decode('ascii', 'replace'))}-endian; "
                f"wcond reads {sys.byteorder}-endian archives only"
            )
        info = z.getinfo(f"{prefix}/data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise _too_big(path, info.file_size)
        with z.open(info) as f:
            data = f.read(MAX_PICKLE_BYTES + 1)  # the header's size is a claim too
    if len(data) > MAX_PICKLE_BYTES:
        raise _too_big(path, len(data))
    root = _Unpickler(data, path, records, prefix).load()
    if not isinstance(root, ScriptObject):
        raise CheckpointError(
            f"{show_path(path)}: corrupt {KIND}: data.pkl holds {type(root).__name__}, not a module"
        )
    return dict(_state_tensors(root, path))


def _small_record(z: zipfile.ZipFile, name: str) -> bytes | None:
    try:
        info = z.getinfo(name)
    except KeyError:
        return None
    with z.open(info) as f:
        return f.read(64)


def _too_big(path: Path, size: int) -> CheckpointError:
    return CheckpointError(
        f"{show_path(path)}: {KIND}'s data.pkl is {size:,} bytes, more than the "
        f"{MAX_PICKLE_BYTES:,} a module tree needs; not read"
    )


def _state_tensors(root: ScriptObject, path: Path) -> Iterator[tuple[str, _TensorSpec]]:
    """(dotted path, tensor) for each module's parameters and buffers, in state_dict() order.

    A module's parameters and buffers are its tensor attributes before ``training`` (all of them
    when a module has no ``training``); its submodules are the objects after it.
    """
    visits = 0
    stack: list[tuple[str, ScriptObject, tuple[int, ...]]] = [("", root, ())]
    while stack:
        prefix, obj, ancestors = stack.pop()
        if id(obj) in ancestors:
            raise CheckpointError(f"{show_path(path)}: corrupt {KIND}: a module contains itself")
        if len(ancestors) > MAX_NESTING:
            raise CheckpointError(
                f"{show_path(path)}: corrupt {KIND}: modules nested more than {MAX_NESTING} levels deep"
            )
        visits += len(obj.attrs)
        if visits > MAX_ATTRIBUTES:
            raise CheckpointError(
                f"{show_path(path)}: corrupt {KIND}: its module tree has more than "
                f"{MAX_ATTRIBUTES:,} attributes"
            )
        in_state = True
        children = []
        for name, value in obj.attrs.items():
            if name == "training":
                in_state = False
            if not isinstance(name, str):
                continue
            if isinstance(value, _TensorSpec) and in_state:
                yield prefix + name, value
            elif isinstance(value, ScriptObject):
                children.append((f"{prefix}{name}.", value, (*ancestors, id(obj))))
        stack.extend(reversed(children))


class _Unpickler(pickle.Unpickler):
    """data.pkl's unpickler: placeholders for ``__torch__`` classes, tensor descriptions, nothing else."""

    def __init__(self, data: bytes, path: Path, records: dict[str, DataRecord], prefix: str):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._records = records
        self._prefix = prefix
        self._classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                if len(self._classes) >= MAX_CLASSES:
                    raise self._corrupt(f"it names more than {MAX_CLASSES:,} module classes")
                self._classes[qualname] = type(
                    "ScriptObject", (ScriptObject,), {"qualname": qualname}
                )
            return self._classes[qualname]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _Call(self._rebuild_tensor)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in ALLOWED_GLOBALS:
            return _Call(ALLOWED_GLOBALS[module, name])
        what = show_key(f"{module}.{name}")
        if (module, name) in _UNSUPPORTED:
            raise CheckpointError(
                f"{show_path(self._path)}: {KIND} stores {_UNSUPPORTED[module, name]} ({what}), "
                "which wcond does not read"
            )
        raise UnsafeCheckpointError(
            f"{show_path(self._path)}: refused: its data.pkl asks for {what}, and wcond never runs "
            "code from a checkpoint. If you trust the file, re-save just the weights: "
            "torch.save(torch.jit.load(path).state_dict(), 'weights.pt')"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_count(pid[4])
        ):
            raise self._corrupt(f"a storage reference is malformed (a {type(pid).__name__})")
        _, stype, key, _location, numel = pid
        record = self._records.get(f"{self._prefix}/data/{key}")
        if record is None:
            raise self._corrupt(f"storage {show_key(key)} has no data record")
        nbytes = numel * stype.dtype.itemsize
        if nbytes > record.size:
            raise CheckpointError(
                f"{show_path(self._path)}: corrupt or truncated {KIND}: storage {show_key(key)} "
                f"claims {nbytes} bytes but its record holds {record.size}"
            )
        return _Storage(key, stype.dtype, numel, record)

    def _rebuild_tensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> _TensorSpec:
        if not isinstance(storage, _Storage):
            raise self._corrupt("a tensor without a storage")
        if not (
            _is_count(offset)
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(map(_is_count, size + stride))
        ):
            raise self._corrupt(
                f"a tensor of storage {show_key(storage.key)} has a malformed shape"
            )
        if metadata:  # conjugate or negative bits: values wcond would read wrong
            raise CheckpointError(
                f"{show_path(self._path)}: {KIND} stores a tensor of storage {show_key(storage.key)} "
                "with metadata (conjugate or negative bits), which wcond does not read"
            )
        if all(size):  # else it holds no elements and reaches no bytes
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.numel:
                raise CheckpointError(
                    f"{show_path(self._path)}: corrupt {KIND}: a tensor of shape {list(size)} reaches "
                    f"element {last} of storage {show_key(storage.key)}, which holds {storage.numel}"
                )
        return _TensorSpec(storage, offset, size, stride)

    def _corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(f"{show_path(self._path)}: corrupt {KIND}: {what}")


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


@contextmanager
def _translated(path: Path) -> Iterator[None]:
    """What a malformed archive makes zipfile, pickle or torch raise -> CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except RecursionError as e:
        raise CheckpointError(f"{show_path(path)}: corrupt {KIND}: pickle nested too deeply") from e
    except MemoryError as e:
        raise CheckpointError(
            f"{show_path(path)}: corrupt {KIND}: it claims more memory than there is"
        ) from e
    except (*LOAD_ERRORS, zlib.error) as e:
        detail = show_key(str(e) or type(e).__name__, limit=160)[1:-1]
        if isinstance(e, pickle.UnpicklingError):
            detail = f"malformed pickle: {detail}"
        raise CheckpointError(f"{show_path(path)}: corrupt or truncated {KIND} ({detail})") from e
