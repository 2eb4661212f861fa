"""Read and write PyTorch `torch.save` files without torch and without executing pickled code.

Reading: `load_torch_file(path)` unpickles `data.pkl` of a torch.save zip archive (also a `.bin`
of Hugging Face, and the legacy non-zip format) with a restricted `pickle.Unpickler`: `find_class`
resolves only the tensor-rebuild globals (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`,
`collections.OrderedDict`, the `torch.*Storage` types, `torch.device`, `torch.Size`, dtypes) to
numpy-based stand-ins; any other global raises `UnsafePickleError` naming it, before anything is
called.  Tensors come back as C-contiguous numpy arrays (strides and storage offsets honoured;
float32/64, float16, bfloat16 via ml_dtypes, int8-64, uint8, bool).

Writing: `save_torch_state_dict(path, state_dict, extra)` emits pickle protocol 2 by hand
(`torch._utils._rebuild_tensor_v2` reduce calls with persistent ids
`('storage', torch.XStorage, key, 'cpu', numel)`) into a torch.save zip archive that
`torch.load(path, weights_only=True)` accepts.  Layout: the reference checkpoint
`{'model_state_dict': OrderedDict(sd), 'optimizer_state_dict': None, 'loss': None,
'accuracy': None}`.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

__all__ = ["UnsafePickleError", "load_torch_file", "load_torch_state_dict", "save_torch_state_dict",
           "save_torch_file"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the tensor-rebuild allow-list (nothing was executed)."""


# --------------------------------------------------------------------------- dtypes
# torch storage class name -> numpy dtype
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGES = {v: k for k, v in _STORAGE_DTYPES.items()}

# torch dtype attribute names (for `torch.float32` globals, e.g. in tensor metadata)
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}


class _NoBuild:
    """Refuses pickle's BUILD opcode, so a pickle cannot alter the loader's own objects."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"pickle tried to set the state of {self!r}; refused")


class _Frozen(_NoBuild):
    """Immutable once built (allow-listed globals are shared between loads)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise UnsafePickleError(f"pickle tried to modify {self!r}; refused")


class _StorageType(_Frozen):
    """Stand-in for a `torch.XStorage` class: only carries its numpy dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self):
        return f"<storage type torch.{self.name} ({self.dtype})>"

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(f"constructing torch.{self.name} directly is not supported")


class _TorchDtype(_Frozen):
    """Stand-in for a `torch.<dtype>` global (e.g. in metadata); `.numpy` is the numpy dtype."""

    __slots__ = ("name", "numpy")

    def __init__(self, name: str, dtype: np.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "numpy", dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _SafeCallable(_Frozen):
    """An allow-listed callable, wrapped so a pickle cannot set attributes on the function."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self):
        return f"<allowed global {self._name}>"


class _Storage(_NoBuild):
    """A flat typed storage: `data` is a 1-D numpy array (None until filled, legacy format)."""

    __slots__ = ("dtype", "numel", "data")

    def __init__(self, dtype: np.dtype, numel: int, data: np.ndarray | None = None):
        self.dtype, self.numel, self.data = dtype, numel, data


class _PendingTensor(_NoBuild):
    """Legacy format: a tensor whose storage bytes come after the pickle."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


# --------------------------------------------------------------------------- rebuild stand-ins
def _check_ints(name: str, values) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except TypeError as e:
        raise pickle.UnpicklingError(f"tensor {name} must be a sequence of ints, got {values!r}") from e
    if any(isinstance(v, bool) or v < 0 for v in values):
        raise pickle.UnpicklingError(f"tensor {name} must be non-negative ints, got {values!r}")
    return out


def _materialise(storage: _Storage, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """View `size`/`stride` (elements) at `offset` of a storage, copied to a C-contiguous array."""
    if storage.data is None:
        raise pickle.UnpicklingError("tensor storage was never filled (truncated file?)")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.data.size:
        raise pickle.UnpicklingError(
            f"tensor (offset {offset}, size {size}, stride {stride}) reads past its storage of "
            f"{storage.data.size} elements")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage.data[offset:], shape=size,
                                           strides=tuple(st * item for st in stride), writeable=False)
    return np.array(view, order="C", copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Stand-in for torch._utils._rebuild_tensor(_v2): returns a numpy array."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuild got a non-storage {type(storage).__name__}")
    offset = _check_ints("offset", (storage_offset,))[0]
    size, stride = _check_ints("size", size), _check_ints("stride", stride)
    if storage.data is None:  # legacy: bytes follow the pickle
        return _PendingTensor(storage, offset, size, stride)
    return _materialise(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    """Stand-in for torch._utils._rebuild_parameter(_with_state): the tensor itself."""
    if not isinstance(data, (np.ndarray, _PendingTensor)):
        raise pickle.UnpicklingError(f"parameter rebuild got {type(data).__name__}, not a tensor")
    return data


def _device(*args, **kwargs) -> str:
    """Stand-in for torch.device(...): a plain string."""
    return ":".join(str(a) for a in args)


def _codecs_encode(obj, encoding="utf-8", *_ignored):
    """Stand-in for _codecs.encode as used by protocol-2 pickles of `bytes`: latin1 text -> bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode only supported for (str, 'latin1'), got {encoding!r}")
    return obj.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> stand-in.  Builtin types (OrderedDict, tuple) are immutable classes."""
    fns = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "device"): _device,
        ("_codecs", "encode"): _codecs_encode,
    }
    allowed: dict[tuple[str, str], Any] = {k: _SafeCallable(f, ".".join(k)) for k, f in fns.items()}
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("torch", "Size")] = tuple
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage", np.dtype(np.uint8))
    for name, dt in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dt)
    for name, dt in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDtype(name, dt)
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and reads storages via a callback."""

    def __init__(self, file, storage_loader):
        super().__init__(file, encoding="utf-8")
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only torch tensor-rebuild globals are "
                f"allowed (the file may contain code; nothing was executed)") from None

    def persistent_load(self, pid):
        if self._storage_loader is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._storage_loader(pid)


def _parse_pid(pid) -> tuple[_StorageType, str, int, Any]:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} (expected a torch storage)")
    stype, key, _location, numel = pid[1:5]
    if not isinstance(stype, _StorageType):
        raise pickle.UnpicklingError(f"persistent id names an unknown storage type {stype!r}")
    numel = _check_ints("storage numel", (numel,))[0]
    view = pid[5] if len(pid) > 5 else None
    return stype, str(key), numel, view


def _bytes_to_array(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    arr = np.frombuffer(raw, dtype=np.uint8)
    if big_endian and dtype.itemsize > 1:
        arr = arr.view(f">u{dtype.itemsize}").astype(f"<u{dtype.itemsize}")
    return arr.view(dtype)


# --------------------------------------------------------------------------- zip format
def _load_zip(zf: zipfile.ZipFile, where: str) -> Any:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise ValueError(f"{where}: not a torch.save archive (expected one '<prefix>/data.pkl', "
                         f"found {pkls or 'none'})")
    prefix = pkls[0][: -len("data.pkl")]
    big = False
    if prefix + "byteorder" in names:
        order = zf.read(prefix + "byteorder").decode().strip()
        if order not in ("little", "big"):
            raise ValueError(f"{where}: unknown byteorder {order!r}")
        big = order == "big"
    storages: dict[str, _Storage] = {}

    def load_storage(pid):
        stype, key, numel, _ = _parse_pid(pid)
        if key not in storages:
            rec = f"{prefix}data/{key}"
            if rec not in names:
                raise pickle.UnpicklingError(f"{where}: storage record {rec!r} is missing")
            raw = zf.read(rec)
            need = numel * stype.dtype.itemsize
            if len(raw) < need:
                raise pickle.UnpicklingError(
                    f"{where}: storage {key} has {len(raw)} bytes, expected {need} ({numel} x {stype.dtype})")
            storages[key] = _Storage(stype.dtype, numel, _bytes_to_array(raw[:need], stype.dtype, big))
        st = storages[key]
        if st.dtype != stype.dtype:  # the same bytes reinterpreted (rare, e.g. untyped storages)
            raw = st.data.view(np.uint8)
            return _Storage(stype.dtype, raw.size // stype.dtype.itemsize, raw.view(stype.dtype))
        return st

    with zf.open(prefix + "data.pkl") as f:
        return _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()


# --------------------------------------------------------------------------- legacy format
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(f, where: str) -> Any:
    """torch.save(..., _use_new_zipfile_serialization=False): five pickles then raw storages."""
    def small_pickle():
        return _RestrictedUnpickler(f, None).load()

    try:
        magic = small_pickle()
    except Exception as e:
        raise ValueError(f"{where}: not a torch checkpoint (neither a zip archive nor a legacy "
                         f"torch.save file): {e}") from e
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{where}: not a torch checkpoint (no torch.save zip archive or legacy "
                         f"magic number)")
    protocol = small_pickle()
    if protocol != 1001:
        raise ValueError(f"{where}: unsupported legacy torch protocol version {protocol!r}")
    sys_info = small_pickle()
    big = isinstance(sys_info, dict) and sys_info.get("little_endian") is False

    roots: dict[str, _Storage] = {}
    views: list[tuple[_Storage, str, int]] = []

    def load_storage(pid):
        stype, key, numel, view = _parse_pid(pid)
        if key not in roots:
            roots[key] = _Storage(stype.dtype, numel)
        if view is None:
            return roots[key]
        _view_key, v_offset, v_size = view
        vs = _Storage(stype.dtype, int(v_size))
        views.append((vs, key, int(v_offset)))
        return vs

    result = _RestrictedUnpickler(f, load_storage).load()
    keys = small_pickle()
    if not isinstance(keys, list):
        raise ValueError(f"{where}: malformed legacy checkpoint (storage key list is {type(keys).__name__})")
    for key in keys:
        if key not in roots:
            raise ValueError(f"{where}: storage {key!r} listed but never referenced")
        st = roots[key]
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{where}: truncated legacy checkpoint (storage {key})")
        (numel,) = struct.unpack("<q", head)
        need = numel * st.dtype.itemsize
        raw = f.read(need)
        if len(raw) != need or numel != st.numel:
            raise ValueError(f"{where}: truncated or inconsistent storage {key} ({len(raw)} of {need} bytes)")
        st.data = _bytes_to_array(raw, st.dtype, big)
    for vs, key, off in views:
        vs.data = roots[key].data[off: off + vs.numel]

    def resolve(obj):
        if isinstance(obj, _PendingTensor):
            return _materialise(obj.storage, obj.offset, obj.size, obj.stride)
        if isinstance(obj, dict):
            for k in list(obj):
                obj[k] = resolve(obj[k])
            return obj
        if isinstance(obj, list):
            return [resolve(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(resolve(v) for v in obj)
        return obj

    return resolve(result)


# --------------------------------------------------------------------------- public reading
def load_torch_file(path: str | os.PathLike) -> Any:
    """Unpickle a torch.save file safely; tensors become numpy arrays, OrderedDicts stay.

    Raises FileNotFoundError, UnsafePickleError (disallowed global), or ValueError (corrupt file).
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"torch checkpoint not found: {where}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return _load_zip(zf, where)
        with open(path, "rb") as f:
            return _load_legacy(f, where)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, KeyError,
            UnicodeDecodeError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: corrupt or unsupported torch checkpoint: {type(e).__name__}: {e}") from e


def load_torch_state_dict(path: str | os.PathLike, key: str = "model_state_dict") -> dict[str, np.ndarray]:
    """A flat {name: array} state dict from a torch.save file.

    Accepts a wrapper dict holding the state dict under `key` (the reference checkpoint layout)
    or a bare state dict.  Non-array entries of a bare dict raise ValueError.
    """
    obj = load_torch_file(path)
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping), got {type(obj).__name__}")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
    if bad:
        raise ValueError(f"{path}: not a flat state dict of tensors; non-tensor entries: {bad[:10]}"
                         + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
    return {str(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------- writing
class _PickleWriter:
    """Minimal protocol-2 pickler for state dicts: tensors, dicts, lists, tuples and scalars."""

    def __init__(self):
        self.out = io.BytesIO()
        self.storages: list[tuple[str, np.ndarray]] = []

    def w(self, b: bytes):
        self.out.write(b)

    def global_(self, module: str, name: str):
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def dump(self, obj) -> bytes:
        self.w(b"\x80\x02")
        self.save(obj)
        self.w(b".")
        return self.out.getvalue()

    def save(self, obj):
        if obj is None:
            self.w(b"N")
        elif isinstance(obj, (bool, np.bool_)):
            self.w(b"\x88" if obj else b"\x89")
        elif isinstance(obj, (int, np.integer)):
            self.save_int(int(obj))
        elif isinstance(obj, (float, np.floating)):
            self.w(b"G" + struct.pack(">d", float(obj)))
        elif isinstance(obj, str):
            b = obj.encode("utf-8", "surrogatepass")
            self.w(b"X" + struct.pack("<I", len(b)) + b)
        elif isinstance(obj, np.ndarray):
            self.save_tensor(obj)
        elif isinstance(obj, collections.OrderedDict):
            self.global_("collections", "OrderedDict")
            self.w(b")R")
            self.save_items(obj)
        elif isinstance(obj, dict):
            self.w(b"}")
            self.save_items(obj)
        elif isinstance(obj, list):
            self.w(b"]")
            if obj:
                self.w(b"(")
                for v in obj:
                    self.save(v)
                self.w(b"e")
        elif isinstance(obj, tuple):
            self.save_tuple(obj)
        else:
            raise TypeError(f"cannot write {type(obj).__name__} into a torch checkpoint "
                            f"(supported: arrays, dict, list, tuple, str, int, float, bool, None)")

    def save_int(self, v: int):
        if 0 <= v < 256:
            self.w(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.w(b"M" + struct.pack("<H", v))
        elif -(2 ** 31) <= v < 2 ** 31:
            self.w(b"J" + struct.pack("<i", v))
        else:
            n = (v.bit_length() + 8) // 8
            b = v.to_bytes(n, "little", signed=True)
            if n > 255:
                raise ValueError(f"integer too large to pickle: {v}")
            self.w(b"\x8a" + bytes([n]) + b)

    def save_tuple(self, t: tuple):
        if not t:
            self.w(b")")
            return
        self.w(b"(")
        for v in t:
            self.save(v)
        self.w(b"t")

    def save_items(self, d: Mapping):
        if not d:
            return
        self.w(b"(")
        for k, v in d.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint dict keys must be str or int, got {type(k).__name__}")
            self.save(k)
            self.save(v)
        self.w(b"u")

    def save_tensor(self, arr: np.ndarray):
        dt = arr.dtype
        if dt not in _DTYPE_STORAGES:
            raise TypeError(f"cannot write dtype {dt} into a torch checkpoint; supported: "
                            f"{sorted(str(d) for d in _DTYPE_STORAGES)}")
        arr = arr if arr.flags.c_contiguous else np.array(arr, order="C")  # keeps 0-d arrays 0-d
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        key = str(len(self.storages))
        self.storages.append((key, arr))
        shape = tuple(int(s) for s in arr.shape)
        stride, acc = [], 1
        for s in reversed(shape):
            stride.append(acc)
            acc *= max(s, 1)
        stride = tuple(reversed(stride))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.w(b"(")
        # persistent id ('storage', torch.XStorage, key, 'cpu', numel)
        self.w(b"(")
        self.save("storage")
        self.global_("torch", _DTYPE_STORAGES[dt])
        self.save(key)
        self.save("cpu")
        self.save_int(int(arr.size))
        self.w(b"tQ")
        self.save_int(0)  # storage offset
        self.save_tuple(shape)
        self.save_tuple(stride)
        self.w(b"\x89")  # requires_grad False
        self.global_("collections", "OrderedDict")  # backward hooks
        self.w(b")R")
        self.w(b"tR")


def _write_aligned(zf: zipfile.ZipFile, name: str, data, align: int = 64) -> None:
    """Write an uncompressed record whose data starts on an `align`-byte boundary (as torch).

    data: bytes or a C-contiguous numpy array (streamed without an extra copy).
    """
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    try:
        start = zf.fp.tell() + 30 + len(name.encode())
    except (AttributeError, OSError):
        start = None
    if start is not None:
        pad = (-(start + 4)) % align
        info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    if isinstance(data, np.ndarray):
        buf = memoryview(data.reshape(-1).view(np.uint8))
        with zf.open(info, "w", force_zip64=buf.nbytes >= 2 ** 31) as f:
            f.write(buf)
    else:
        zf.writestr(info, data)


def save_torch_file(path: str | os.PathLike, obj: Any, *, archive_name: str | None = None) -> Path:
    """Write `obj` (nested dict/list of numpy arrays and scalars) in torch.save's zip format."""
    path = Path(path)
    prefix = archive_name or (path.stem or "archive")
    prefix = "".join(c if c.isalnum() or c in "._-" else "_" for c in prefix)
    writer = _PickleWriter()
    pkl = writer.dump(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_aligned(zf, f"{prefix}/data.pkl", pkl)
        _write_aligned(zf, f"{prefix}/.format_version", b"1")
        _write_aligned(zf, f"{prefix}/.storage_alignment", b"64")
        _write_aligned(zf, f"{prefix}/byteorder", b"little")
        for key, arr in writer.storages:
            _write_aligned(zf, f"{prefix}/data/{key}", arr)
        _write_aligned(zf, f"{prefix}/version", b"3\n")
    os.replace(tmp, path)
    return path


def save_torch_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                          extra: Mapping[str, Any] | None = None) -> Path:
    """Write a reference-layout checkpoint `{'model_state_dict': sd, 'optimizer_state_dict': None,
    'loss': None, 'accuracy': None}` (`extra` overrides/extends the non-model entries)."""
    sd = collections.OrderedDict((str(k), np.asarray(v)) for k, v in state_dict.items())
    obj: dict[str, Any] = {"model_state_dict": sd, "optimizer_state_dict": None, "loss": None,
                           "accuracy": None}
    if extra:
        if "model_state_dict" in extra:
            raise ValueError("extra must not contain 'model_state_dict'")
        obj.update(extra)
    return save_torch_file(path, obj)
