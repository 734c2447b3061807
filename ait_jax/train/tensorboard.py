"""TensorBoard event files for scalars, without TensorFlow.

An event file is a TFRecord stream (length, masked CRC32C of the length, payload,
masked CRC32C of the payload) of `Event` protocol buffers. Scalars need three tiny
messages, encoded here by hand:

  Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
            Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }
"""

import os
import socket
import struct
import time

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, *, summary: bytes = b"",
           file_version: str = "") -> bytes:
  out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version:
    out += _bytes_field(3, file_version.encode())
  if summary:
    out += _bytes_field(5, summary)
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  return _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value)


class SummaryWriter:
  """Appends scalar summaries to `events.out.tfevents.*` in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write(_event(0, time.time(), file_version="brain.Event:2"))

  def _write(self, record: bytes) -> None:
    header = struct.pack("<Q", len(record))
    self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                     + struct.pack("<I", _masked_crc(record)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    summary = b"".join(_bytes_field(1, _scalar_value(k, float(v)))
                       for k, v in values.items())
    self._write(_event(step, time.time(), summary=summary))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_scalars(path: str) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in an event file (checks every CRC)."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc(header):
      raise ValueError(f"{path}: bad length CRC at byte {pos}")
    record = data[pos + 12:pos + 12 + length]
    if struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != \
        _masked_crc(record):
      raise ValueError(f"{path}: bad record CRC at byte {pos}")
    pos += 16 + length
    out += _parse_event(record)
  return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  shift = value = 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def _fields(buf: bytes):
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield number, value


def _parse_event(record: bytes) -> list[tuple[int, str, float]]:
  step, summary = 0, None
  for number, value in _fields(record):
    if number == 2:
      step = value
    elif number == 5:
      summary = value
  out = []
  for number, value in _fields(summary or b""):
    if number != 1:
      continue
    tag, scalar = "", None
    for n, v in _fields(value):
      if n == 1:
        tag = v.decode()
      elif n == 2:
        scalar = struct.unpack("<f", v)[0]
    if scalar is not None:
      out.append((step, tag, scalar))
  return out
