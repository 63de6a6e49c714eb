"""Reading one webdataset shard: its samples in order, and in their place what cannot be read,
so that a stream counts each bad sample, and each unreadable rest of a shard, exactly once."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples


class _StrictTarInfo(tarfile.TarInfo):
    """A tar header that ends the archive only where it is the end-of-archive marker (a zero
    block): tarfile ends quietly at a missing, truncated or damaged header after the first one,
    which would lose the rest of a shard cut at a member boundary without a word."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.EmptyHeaderError:
            message = f"the file ends at byte {tar.offset} without an end-of-archive marker"
            raise tarfile.ReadError(message) from None
        except tarfile.HeaderError as exn:
            raise tarfile.ReadError(f"{exn} at byte {tar.offset}") from None


def _check_end(tar: tarfile.TarFile) -> None:
    """Raise if anything but zeros follows the end-of-archive marker (a damaged block that
    read as one, or tars concatenated, whose later members tarfile would not read)."""
    while chunk := tar.fileobj.read(1 << 16):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"data after the end-of-archive marker at byte {tar.offset}")


@dataclass
class Unreadable:
    """What a shard reader could not turn into a sample: one sample, or a shard's remainder."""

    where: str
    error: Exception


def read_shard(url: str) -> Iterator[dict | Unreadable]:
    """The samples of one shard in order, grouped as webdataset groups them (consecutive
    members sharing a key; ``__key__`` and ``__url__`` added), with what cannot be read in their
    place: a sample holding a member twice, or, after a read error, the rest of the shard (the
    sample in progress included) as one ``Unreadable``.

    webdataset's own reader reports one read error up to three times and carries a partly read
    sample into the next shard; here tarfile reads what webdataset's ``gopen`` opens."""
    sample: dict | None = None
    done = 0

    def finished(complete: dict) -> dict | Unreadable:
        twice = complete.pop("__twice__", None)
        if twice is None:
            return complete
        return Unreadable(f"sample {complete['__key__']} in shard {url}", ValueError(twice))

    try:
        with (
            gopen(url) as stream,
            tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar,
        ):
            for member in tar:
                tar.members = []  # read once as a stream: keep no index of the members
                key, ext = base_plus_ext(member.name)
                if not member.isreg() or key is None or _META.match(member.name):
                    continue
                if sample is None or key != sample["__key__"]:
                    if sample is not None:  # complete: the next key begins
                        yield finished(sample)
                        done += 1
                    sample = {"__key__": key, "__url__": url}
                ext = ext.lower()
                if ext in sample:
                    sample["__twice__"] = f"member {member.name} appears twice"
                sample[ext] = tar.extractfile(member).read()
            if sample is not None:  # complete: the archive ended at its marker
                yield finished(sample)
                done += 1
            _check_end(tar)
    except Exception as exn:  # noqa: BLE001 - whatever stops the read, the rest is unreadable
        rest = f"the rest of shard {url} after {done} samples" if done else f"shard {url}"
        yield Unreadable(rest, exn)
