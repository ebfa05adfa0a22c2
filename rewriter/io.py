"""Reading and writing model files, in one place: paths checked before any work, models
loaded lazily (external tensors stay memory-mapped), atomic writes that clean up after
themselves, and external data above 2 GB.

Guarantees (and their limits):

* inputs must be regular files; a FIFO, device or directory is refused without opening it;
* an output (model, its data file, ``--report``) that exists must be a regular file or a
  symlink to one; a symlink is replaced by the new file, never written through;
* nothing is written to the input or to any file the input model references (its external
  data): an output whose default data-file name ``<name>.data`` is one of them gets
  ``<name>.<n>.data`` instead (logged), an output that *is* one of them is refused;
* writes go to a temporary folder ``.ogn-<pid>-*`` beside the target and are renamed into
  place (data first, with SIGINT/SIGTERM held off during the renames); the folder is removed
  on every exit Python sees (errors, SIGINT, SIGTERM once the CLI has installed its
  handler). A folder left by a killed process (SIGKILL, power loss) is removed by the next
  write into the same directory once its process is gone (pids are checked on this machine
  only: on a shared network folder, one left by another machine's process stays).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator

import onnx
import onnx_ir as ir

from .errors import ModelFileError, model_file_error

__all__ = [
    "ModelFileError",
    "EXTERNAL_DATA_THRESHOLD",
    "TEMP_PREFIX",
    "check_input_path",
    "check_output_path",
    "check_paths",
    "check_spares_input",
    "referenced_files",
    "estimated_size",
    "in_memory_bytes",
    "external_folders",
    "temp_dir",
    "INLINE_WEIGHTS_BYTES",
    "offload_weights",
    "load_model",
    "save_model",
    "save_text",
    "remove_stale_temps",
]

logger = logging.getLogger(__name__)

#: Protobuf cannot serialise a message over 2 GiB: above this (estimated from the tensors'
#: sizes, never from ``ByteSize()``, which itself fails above 2 GiB) tensors go to external
#: data. Read at call time, so tests may lower it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20

#: Our temporary files and folders: ``.ogn-<pid>-<random>``. Short, so that any legal output
#: name fits; the pid tells a stale one (its process is gone) from one in use.
TEMP_PREFIX = ".ogn-"
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")

#: Weights in memory up to this many bytes in all may travel inside a graph (given to
#: onnxruntime for --verify); above it they go to a data file onnxruntime memory-maps.
INLINE_WEIGHTS_BYTES = 64 * 2**20
#: Offsets of large tensors in the data files we write for onnxruntime: a multiple of the
#: page size (64 KiB covers every platform), so that it memory-maps them instead of copying.
MMAP_ALIGNMENT = 65536
#: Tensors up to this size stay inline in such a graph: onnxruntime's shape inference at
#: load time needs shape constants inline (it cannot read them from external data).
INLINE_TENSOR_BYTES = 64 * 1024

#: Bytes per node the size estimate adds for the graph itself (names, attributes).
_BYTES_PER_NODE = 256
#: Tensors smaller than this stay inside the model file when we write external data.
_EXTERNAL_MIN_BYTES = 1024

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _name_max(directory: pathlib.Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_input_path(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a Path if it is a readable regular file (or a symlink to one); checked
    with ``os.stat`` before anything opens it, so a FIFO never blocks us."""
    path = pathlib.Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{path}: is a directory, not an ONNX model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"{path}: permission denied")
    return path


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def _writes_into(target: pathlib.Path, protected: Iterable[pathlib.Path]) -> pathlib.Path | None:
    """The protected file that writing ``target`` would replace. We replace the directory
    entry (a symlink is replaced, not followed), so compare the entry's real directory."""
    entry = pathlib.Path(os.path.realpath(target.parent)) / target.name
    for p in protected:
        if _same_file(entry, p):
            return p
    return None


def check_output_path(output: str | os.PathLike, input: str | os.PathLike | None = None, *, what: str = "output") -> pathlib.Path:
    """``output`` as a Path if we may write it: a name the file system accepts, an existing
    writable directory, and either nothing there or a regular file (or a symlink to one)
    that is not the input."""
    output = pathlib.Path(output)
    parent = pathlib.Path(os.path.realpath(output.parent))
    if not parent.is_dir():
        raise ModelFileError(f"{output}: the {what} directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelFileError(f"{output}: the {what} directory {parent} is not writable")
    name_max = _name_max(parent)
    if len(os.fsencode(output.name)) > name_max:
        raise ModelFileError(f"{output}: the file name is {len(os.fsencode(output.name))} bytes long; this file system allows {name_max}")
    try:
        st = os.stat(output)
    except FileNotFoundError:
        st = None  # nothing there, or a dangling symlink: it is replaced
    except OSError as e:
        raise ModelFileError(f"{output}: cannot check the {what} path: {e.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(f"{output}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{output}: exists and is {_kind(st.st_mode)}; only a regular file is replaced by the {what}")
    if input is not None and _writes_into(output, [pathlib.Path(input)]):
        raise ModelFileError(f"{output}: the {what} path is the input file; choose another path (the input is never overwritten)")
    return output


def check_paths(
    input: str | os.PathLike, output: str | os.PathLike | None = None, report: str | os.PathLike | None = None
) -> tuple[pathlib.Path, pathlib.Path | None, pathlib.Path | None]:
    """Check every path of one run before any work: the input, the model output and the
    report output, and that no two of them are the same file."""
    input = check_input_path(input)
    if output is not None:
        output = check_output_path(output, input)
    if report is not None:
        report = check_output_path(report, input, what="report")
        if output is not None and _writes_into(report, [output]):
            raise ModelFileError(f"{report}: the report path is the model output path; give --report another file")
    return input, output, report


def check_spares_input(input: str | os.PathLike, *outputs: str | os.PathLike | None) -> None:
    """Refuse any of ``outputs`` that is a file the input model references (its external
    data). Cheap after :func:`load_model` (which records them); call it before the work."""
    protected = referenced_files(input)
    for output in outputs:
        if output is not None and (hit := _writes_into(pathlib.Path(output), protected)) is not None:
            raise ModelFileError(f"{output}: is a data file of the input model {input} ({hit}); choose another output path")


# ---------------------------------------------------------------------------------------
# Tensors of a model


def _tensor_slots(model: ir.Model) -> Iterator[tuple[object, str, ir.TensorProtocol]]:
    """(owner, key, tensor) for every tensor stored in ``model``: initializers of every graph
    (functions included) and tensor attributes; ``owner`` is the ir.Value or ir.Node."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value, "", value.const_value
        for node in graph:
            for name, attr in node.attributes.items():
                if not attr.is_ref() and attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield node, name, attr.value
    for function in model.functions.values():
        for node in function:
            for name, attr in node.attributes.items():
                if not attr.is_ref() and attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield node, name, attr.value


def _set_tensor(owner, key: str, tensor: ir.TensorProtocol) -> None:
    if isinstance(owner, ir.Value):
        owner.const_value = tensor
    else:
        owner.attributes[key] = ir.AttrTensor(key, tensor)


def estimated_size(model: ir.Model) -> int:
    """Bytes the model would take serialised, from its tensors' sizes (never serialising)."""
    tensors = sum(tensor.nbytes for _, _, tensor in _tensor_slots(model))
    nodes = sum(1 for graph in model.graphs() for _ in graph) + sum(len(f) for f in model.functions.values())
    return tensors + _BYTES_PER_NODE * nodes


def in_memory_bytes(model: ir.Model) -> int:
    """Bytes of the tensors ``model`` holds in memory (not in external data)."""
    return sum(tensor.nbytes for _, _, tensor in _tensor_slots(model) if not isinstance(tensor, ir.ExternalTensor))


def external_folders(model: ir.Model) -> set[pathlib.Path]:
    """The folders the external tensors of ``model`` are read relative to (their base_dir)."""
    return {pathlib.Path(os.path.realpath(t.base_dir or ".")) for _, _, t in _tensor_slots(model) if isinstance(t, ir.ExternalTensor)}


def offload_weights(model: ir.Model, folder: str | os.PathLike, name: str = "weights.data") -> None:
    """Move the initializers ``model`` holds in memory (above :data:`INLINE_TENSOR_BYTES`)
    into ``folder/name``, in place: from then on they are read from there, memory-mapped, and
    the memory that held them is freed. ``folder`` must outlive every use of ``model``."""
    ir.external_data.unload_from_model(model, folder, name, size_threshold_bytes=INLINE_TENSOR_BYTES, alignment=MMAP_ALIGNMENT)
    # The small tensors left are views into the protobuf message the file was parsed into:
    # one of them keeps all of it alive. Copied, they let it go.
    for owner, key, tensor in list(_tensor_slots(model)):
        if isinstance(tensor, ir.TensorProtoTensor) and tensor.dtype != ir.DataType.STRING:
            _set_tensor(owner, key, ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string))


def _external_paths(model: ir.Model) -> set[pathlib.Path]:
    return {pathlib.Path(t.path) for _, _, t in _tensor_slots(model) if isinstance(t, ir.ExternalTensor)}


#: input path (real) -> the files its model references, filled by load_model.
_REFERENCED: dict[str, set[pathlib.Path]] = {}


def referenced_files(path: str | os.PathLike) -> set[pathlib.Path]:
    """The external data files the model at ``path`` references (read once, lazily)."""
    key = os.path.realpath(path)
    if key not in _REFERENCED:
        proto = onnx.load(os.fspath(path), load_external_data=False)
        model = ir.from_proto(proto)
        ir.external_data.set_base_dir(model.graph, os.path.dirname(os.path.abspath(path)))
        _REFERENCED[key] = _external_paths(model)
    return _REFERENCED[key]


def _validate_tensors(model: ir.Model, path: pathlib.Path) -> None:
    """Refuse tensors whose data cannot match their shape (the rules would read them):
    raw_data of the wrong length, external data past the end of its file or missing."""
    for _, _, tensor in _tensor_slots(model):
        name = tensor.name or "<unnamed>"
        if isinstance(tensor, ir.ExternalTensor):
            data = pathlib.Path(tensor.path)
            try:
                st = os.stat(data)
            except OSError as e:
                raise ModelFileError(f"{path}: cannot read the external data of tensor {name!r}: {e.strerror}: {data}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ModelFileError(f"{path}: the external data of tensor {name!r} is {_kind(st.st_mode)}: {data}")
            folder = os.path.realpath(tensor.base_dir or ".")
            if not os.path.realpath(data).startswith(folder + os.sep):
                # onnx-ir and onnxruntime refuse to read it (a path traversal guard): say so now.
                raise ModelFileError(f"{path}: the external data of tensor {name!r} resolves outside the model's folder: {data} -> {os.path.realpath(data)}")
            end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
            if end > st.st_size or (tensor.length is not None and tensor.length != tensor.nbytes):
                raise ModelFileError(
                    f"{path}: malformed initializer {name!r}: its external data ({tensor.length} bytes at offset "
                    f"{tensor.offset or 0} of {st.st_size}) does not hold {tensor.nbytes} bytes"
                )
            continue
        proto = getattr(tensor, "raw", None)
        if isinstance(proto, onnx.TensorProto) and proto.HasField("raw_data"):
            have, need = len(proto.raw_data), tensor.nbytes
            if have != need and proto.data_type != onnx.TensorProto.STRING:
                raise ModelFileError(f"{path}: malformed initializer {name!r}: raw_data has {have} bytes, its shape {list(proto.dims)} needs {need}")


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` as an ``onnx_ir.Model`` whose external tensors stay on disk
    (memory-mapped when read): one ``.data`` file or one file per tensor (the layout the
    TorchScript exporter writes above 2 GB). Raise ModelFileError saying what is wrong."""
    path = check_input_path(path)
    try:
        model = ir.load(os.fspath(path))
    except Exception as e:  # the one place that tells a bad file from a bug: errors.model_file_error
        error = model_file_error(e, path)
        if error is None:
            error = ModelFileError(f"{path}: not an ONNX model ({type(e).__name__}: {e})")
        raise error from e
    if model.ir_version == 0:
        raise ModelFileError(f"{path}: not an ONNX model (no IR version)")
    _validate_tensors(model, path)
    _REFERENCED[os.path.realpath(path)] = _external_paths(model)
    return model


# ---------------------------------------------------------------------------------------
# Writing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Remove our temporary files and folders in ``directory`` whose process is gone."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        path = pathlib.Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted write", path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the renames run, so that a model never lands without its data."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def temp_dir(directory: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A new folder ``.ogn-<pid>-*`` in ``directory``, removed on exit (stale ones of dead
    processes are removed first)."""
    remove_stale_temps(directory)
    tmpdir = pathlib.Path(tempfile.mkdtemp(dir=directory, prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
    try:
        yield tmpdir
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _data_name(path: pathlib.Path, protected: set[pathlib.Path]) -> str:
    """``<name>.data``, or ``<name>.<n>.data`` when that is a file the input references
    (or too long a name: then the model name is cut)."""
    name_max = _name_max(path.parent)
    for n in range(1000):
        suffix = ".data" if n == 0 else f".{n}.data"
        stem = path.name
        while len(os.fsencode(stem + suffix)) > name_max:
            stem = stem[:-1]
        candidate = stem + suffix
        if not _writes_into(path.parent / candidate, protected):
            if n:
                logger.warning("%s: %s is a data file of the input model; writing the weights to %s instead", path, path.name + ".data", candidate)
            return candidate
    raise ModelFileError(f"{path}: found no external data file name that the input model does not use")


def _key(field: int, length: int) -> bytes:
    """A length-delimited protobuf field's tag and length."""
    out = bytearray()
    for n in ((field << 3) | 2, length):
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out)


#: Field numbers in onnx.proto: ModelProto.graph and GraphProto.initializer.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5


def _write_streamed(model: ir.Model, path: pathlib.Path) -> None:
    """Write ``model`` as one protobuf file, main-graph initializers one at a time: the rest
    is serialised without them, then each tensor is appended as an initializer field of the
    graph (protobuf concatenates repeated fields in any position). Peak memory: the largest
    tensor, not the model twice over (a ModelProto and its serialised bytes)."""
    graph = model.graph
    initializers = list(graph.initializers.values())
    graph.initializers.clear()
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for value in initializers:
            graph.initializers.add(value)
    # What serialize_model writes for initializers besides their data: a value_info each
    # (type, shape, metadata), first in the list, except for those that are graph inputs.
    inputs = {v.name for v in graph.inputs}
    described = [
        ir.serde.serialize_value(v)
        for v in initializers
        if v.name not in inputs and v.name and (v.shape is not None or v.type is not None or v.metadata_props or v.doc_string)
    ]
    value_info = described + list(proto.graph.value_info)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(value_info)
    head = proto.graph.SerializeToString()
    proto.ClearField("graph")
    sizes = [ir.serde.serialize_tensor(v.const_value).ByteSize() for v in initializers]
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        f.write(_key(_MODEL_GRAPH, len(head) + sum(len(_key(_GRAPH_INITIALIZER, n)) + n for n in sizes)))
        f.write(head)
        for value, size in zip(initializers, sizes):
            data = ir.serde.serialize_tensor(value.const_value).SerializeToString()
            if len(data) != size:  # serialisation is deterministic; never write a corrupt file
                raise RuntimeError(f"tensor {value.name!r} serialised to {len(data)} bytes, then {size}")
            f.write(_key(_GRAPH_INITIALIZER, size))
            f.write(data)
            del data


@contextlib.contextmanager
def _inline_external(model: ir.Model) -> Iterator[None]:
    """External tensors read into memory for the duration (a model under 2 GB is written
    as one file, and the input's data files may be in another folder); restored after."""
    slots = [(owner, key, t) for owner, key, t in _tensor_slots(model) if isinstance(t, ir.ExternalTensor)]
    try:
        for owner, key, tensor in slots:
            _set_tensor(owner, key, ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name))
        yield
    finally:
        for owner, key, tensor in slots:
            _set_tensor(owner, key, tensor)


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike, *, input_path: str | os.PathLike | None = None) -> None:
    """Write ``model`` to ``path`` atomically: a reader sees the old file or the new one.

    Models estimated over :data:`EXTERNAL_DATA_THRESHOLD` get their tensors in one data file
    beside the model (``<name>.data``, see :func:`_data_name`), written with
    ``ir.save(external_data=...)``, external tensors streamed from their memory maps. Never
    writes to ``input_path`` or a file its model (or ``model``) references.
    """
    path = pathlib.Path(path)
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)  # wraps the tensors, no copies
    protected = _external_paths(model)
    if input_path is not None:
        protected |= {pathlib.Path(input_path)} | referenced_files(input_path)
    if (hit := _writes_into(path, protected)) is not None:
        raise ModelFileError(f"{path}: is the input model or one of its data files ({hit}); choose another output path")
    external = estimated_size(model) > EXTERNAL_DATA_THRESHOLD
    try:
        with temp_dir(path.parent) as tmpdir:
            tmp_model = tmpdir / path.name
            if external:
                location = _data_name(path, protected)
                ir.save(model, tmp_model, external_data=location, size_threshold_bytes=_EXTERNAL_MIN_BYTES)
            else:
                with _inline_external(model):
                    _write_streamed(model, tmp_model)
            with _signals_held():
                if external:
                    os.replace(tmpdir / location, path.parent / location)
                os.replace(tmp_model, path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write the model: {e.strerror or e}") from e
    except ModelFileError:
        raise
    except Exception as e:  # serialisation refused the model (e.g. a Constant over 2 GB)
        error = model_file_error(e, path)
        if error is None:
            raise
        raise error from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then a rename),
    with the permissions a new file gets (0644 under the usual umask), not mkstemp's 0600."""
    path = pathlib.Path(path)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(text)
        with _signals_held():
            os.replace(tmp, path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write: {e.strerror or e}") from e
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)
