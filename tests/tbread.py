"""Read scalars back from tensorboardX event files (no TensorFlow needed).

Event files are TFRecord streams: ``uint64 length, uint32 crc, bytes, uint32 crc`` per record,
each record an ``Event`` protobuf.
"""
import glob
import os
import struct

__all__ = ["read_scalars"]


def read_scalars(tb_dir):
    """All scalars under ``tb_dir``: ``{tag: [(step, value), ...]}`` in file order."""
    from tensorboardX.proto import event_pb2
    out = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True)):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            body = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            if len(body) < length:
                break                     # a record still being written
            ev = event_pb2.Event()
            ev.ParseFromString(body)
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out
