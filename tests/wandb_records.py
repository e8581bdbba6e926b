"""Reading an offline wandb run's ``.wandb`` file back, to check what a run would upload.

The file is wandb's transaction log: a 7-byte header (``:W&B``, a 2-byte magic, a version byte),
then 32 KiB blocks of records in the LevelDB log layout (a 4-byte checksum, a 2-byte little-endian
length, a 1-byte type: full, first, middle or last piece), each record a ``Record`` protobuf.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    out, pos, pieces = [], HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the rest of a block too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        body = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pieces = body if kind in (FULL, FIRST) else pieces + body
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            out.append(record)
    return out


def artifacts(run_folder: str | Path) -> list[wandb_internal_pb2.ArtifactRecord]:
    """The Artifact records of the offline run folder(s) matching ``run_folder`` (a folder or a glob)."""
    folder = Path(run_folder)
    files = (
        sorted(folder.glob("*.wandb"))
        if folder.is_dir()
        else sorted(folder.parent.glob(folder.name + "/*.wandb"))
    )
    return [r.artifact for f in files for r in records(f) if r.WhichOneof("record_type") == "artifact"]


def history(path: str | Path) -> dict:
    """Every value a run logged (the last one per key), with logged dicts (images, tables) rebuilt."""
    import json

    out: dict = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            target = out
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = json.loads(item.value_json)
    return out
