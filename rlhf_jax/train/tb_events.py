"""TensorBoard scalar event files, written without TensorFlow, tensorboardX or torch.

tensorboardX imports torch whenever torch is installed (its writer module does), which
cost every stage process 4.6 s on the project's 2-core machine: half a minute of the
default pipeline for a user who also has transformers. A scalar summary needs none of
it: an event file is a sequence of TFRecords (length, masked CRC-32C of the length,
payload, masked CRC-32C of the payload; tensorflow/core/lib/io/record_writer.cc) whose
payloads are `Event` protos (tensorflow/core/util/event.proto): the first carries
`file_version = "brain.Event:2"`, each later one `wall_time`, `step` and a `Summary` of
`Value{tag, simple_value}`. The few protobuf fields are encoded here by hand.
"""
from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):  # Castagnoli polynomial, reflected
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: dict | None = None) -> bytes:
  """One serialized `Event` proto: wall_time = 1 (double), step = 2 (int64),
  file_version = 3 (string), summary = 5 (Summary: repeated Value value = 1;
  Value: tag = 1 (string), simple_value = 2 (float))."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
        for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


def record(payload: bytes) -> bytes:
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", _masked_crc(header)) + payload
          + struct.pack("<I", _masked_crc(payload)))


class ScalarWriter:
  """`add_scalars(step, {tag: value})` into DIR/events.out.tfevents.<time>.<host>, as
  TensorBoard's `--logdir` reads it. A new file per writer (a resumed stage adds one;
  TensorBoard shows the later points of a repeated step)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._f = open(os.path.join(logdir, name), "ab")
    self._f.write(record(event(now, file_version="brain.Event:2")))
    self._f.flush()

  def add_scalars(self, step: int, scalars: dict) -> None:
    if scalars:
      self._f.write(record(event(time.time(), step, scalars=scalars)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()
