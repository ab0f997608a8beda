"""Read an offline wandb run (`offline-run-*/run-*.wandb`) back, with wandb's own protobuf records.

wandb 0.31 ships no reader for its transaction log; the file is a LevelDB-style log (wandb's format
since 0.9): a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks of records, each a
7-byte header (crc32c, length, type: full/first/middle/last) and a serialized `Record`."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"not a wandb transaction log: {ident!r} {magic:#x}"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        payload, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload


def read_offline_run(run_file: Path) -> dict:
    """{'name', 'group', 'config' (wandb.init's config), 'history' (list of logged dicts),
    'finished' (an exit record was written)} of one offline run file."""
    run = {"history": [], "finished": False, "config": {}}
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group,
                       config={u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "exit":
            run["finished"] = True
    return run
