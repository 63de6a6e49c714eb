"""Reading checkpoint files without running their code.

A pickle can name any Python callable and have it called while it loads, so a checkpoint from
elsewhere could run code. ``torch.load(weights_only=True)`` admits tensors and plain data only,
which is all our checkpoints and exports hold. A sharded (FSDP2) checkpoint is a directory that
PyTorch's distributed checkpoint reads with a plain ``pickle.load`` (its ``.metadata``) and a
``torch.load`` that admits any object (its non-tensor entries, such as optimizer settings), so
both are checked here before anything else reads the directory.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

SHARDED_METADATA = "meta.pt"
"""The file of a sharded checkpoint that holds everything but the sharded state."""
TRUST_OPTION = "--trust-checkpoint (Python: trusted=True)"

# What a distributed checkpoint's ``.metadata`` pickle refers to: the layout dataclasses,
# shapes, dtypes and layouts, and the path it was saved to.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # every name of that module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", *(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnreadableCheckpointError(ValueError):
    """A checkpoint that is empty, truncated or not a checkpoint at all."""


class UntrustedCheckpointError(ValueError):
    """A checkpoint that only a full unpickler, which can run code, would load; ``option`` is
    what the user can pass to load it anyway."""

    def __init__(self, path: Path, reason: str, option: str = TRUST_OPTION) -> None:
        super().__init__(
            f"checkpoint {path} does not load with weights_only=True ({reason}): a full "
            f"unpickler could run code; pass {option} only if you trust where it comes from"
        )
        self.path = path
        self.reason = reason


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _METADATA_GLOBALS.get(module, set())
        if allowed is not None and name not in allowed:
            raise pickle.UnpicklingError(f"it imports {module}.{name}")
        return super().find_class(module, name)


class _WeightsOnlyBytes:
    """The part of a load planner that ``FileSystemReader.read_data`` calls for non-tensor
    entries: each is loaded with ``weights_only=True`` and dropped."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        torch.load(value, map_location="cpu", weights_only=True)


def _first_sentence(exn: BaseException) -> str:
    text = str(exn).strip().split("\n")[0].split(". ")[0]
    return f"{type(exn).__name__}: {text}" if text else type(exn).__name__


def _untrusted_reason(exn: pickle.UnpicklingError) -> str | None:
    """Why ``torch.load(weights_only=True)`` refused a file, or None when it was not that."""
    if "Weights only load failed" not in str(exn):
        return None
    if found := re.search(r"GLOBAL ([\w.]+)", str(exn)):
        return f"it imports {found.group(1)}"
    found = re.search(r"Unsupported operand \d+", str(exn))
    return found.group(0) if found else "it holds more than tensors and plain data"


def _load_file(path: Path, trusted: bool) -> dict:
    if path.stat().st_size == 0:
        raise UnreadableCheckpointError(f"checkpoint {path} is empty (0 bytes)")
    # A zip (PyTorch's format) maps its tensors instead of reading them: a check of a large
    # checkpoint costs little, and a truncated zip still fails here (its directory is at the end).
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except pickle.UnpicklingError as exn:
        reason = _untrusted_reason(exn)
        if reason is None:
            raise UnreadableCheckpointError(
                f"checkpoint {path} does not load: {_first_sentence(exn)}"
            ) from None
        raise UntrustedCheckpointError(path, reason) from None
    except Exception as exn:  # noqa: BLE001 - whatever fails, the file is what the user must fix
        raise UnreadableCheckpointError(
            f"checkpoint {path} does not load (truncated or not a PyTorch file: "
            f"{_first_sentence(exn)})"
        ) from None


def check_sharded(path: Path) -> None:
    """Raise unless the distributed checkpoint in directory ``path`` loads without running
    code: its ``.metadata`` refers to nothing but layout classes, and every non-tensor entry
    loads with ``weights_only=True``."""
    metadata_file = path / ".metadata"
    if not metadata_file.is_file() or metadata_file.stat().st_size == 0:
        raise UnreadableCheckpointError(
            f"sharded checkpoint {path} has no .metadata: an incomplete or foreign directory"
        )
    try:
        with metadata_file.open("rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except pickle.UnpicklingError as exn:
        if str(exn).startswith("it imports"):
            raise UntrustedCheckpointError(metadata_file, str(exn)) from None
        raise UnreadableCheckpointError(f"{metadata_file} does not load: {exn}") from None
    except Exception as exn:  # noqa: BLE001
        raise UnreadableCheckpointError(
            f"{metadata_file} does not load: {_first_sentence(exn)}"
        ) from None
    if not isinstance(metadata, Metadata):
        raise UnreadableCheckpointError(f"{metadata_file} is not distributed-checkpoint metadata")
    entries = [
        index
        for index in metadata.storage_data
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata)
    ]
    reader = FileSystemReader(path)
    reader.set_up_storage_reader(metadata, is_coordinator=True)
    zero = torch.Size([0])
    items = [ReadItem(LoadItemType.BYTE_IO, i, zero, i, zero, zero) for i in entries]
    try:
        reader.read_data(LoadPlan(items), _WeightsOnlyBytes()).wait()
    except pickle.UnpicklingError as exn:
        reason = _untrusted_reason(exn) or _first_sentence(exn)
        raise UntrustedCheckpointError(path, reason) from None
    except Exception as exn:  # noqa: BLE001
        raise UnreadableCheckpointError(
            f"sharded checkpoint {path} does not load: {_first_sentence(exn)}"
        ) from None


def read_checkpoint(path: str | Path, trusted: bool = False) -> dict:
    """The checkpoint at ``path`` (a file, or a sharded checkpoint's directory: then its
    ``meta.pt``, the sharded state checked but not read), on the CPU, with tensors memory-mapped
    where the format allows. Unless ``trusted``, nothing in it may run code.

    Raises:
        FileNotFoundError: nothing at ``path``.
        UnreadableCheckpointError: empty, truncated, or not a checkpoint.
        UntrustedCheckpointError: it needs code to load (names the file and the option).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        return _load_file(path, trusted)
    meta = path / SHARDED_METADATA
    if not meta.is_file():
        raise UnreadableCheckpointError(
            f"{path} is a directory without {SHARDED_METADATA}: not a checkpoint"
        )
    if not trusted:
        check_sharded(path)
    return _load_file(meta, trusted)
