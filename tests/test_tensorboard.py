"""TensorBoard event files from MetricsWriter, decoded by the protobuf library itself
(the `Event` message built from tensorflow/core/util/event.proto's field numbers)."""
import glob
import os
import struct
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from rlhf_jax.train.metrics import MetricsWriter
from rlhf_jax.train.tb_events import crc32c, _masked_crc


def _event_class():
  f = descriptor_pb2.FileDescriptorProto(name="tb_event_test.proto", package="tbtest")
  T = descriptor_pb2.FieldDescriptorProto
  value = f.message_type.add(name="Value")
  value.field.add(name="tag", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
  value.field.add(name="simple_value", number=2, type=T.TYPE_FLOAT, label=T.LABEL_OPTIONAL)
  summary = f.message_type.add(name="Summary")
  summary.field.add(name="value", number=1, type=T.TYPE_MESSAGE, type_name=".tbtest.Value",
                    label=T.LABEL_REPEATED)
  ev = f.message_type.add(name="Event")
  ev.field.add(name="wall_time", number=1, type=T.TYPE_DOUBLE, label=T.LABEL_OPTIONAL)
  ev.field.add(name="step", number=2, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL)
  ev.field.add(name="file_version", number=3, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
  ev.field.add(name="summary", number=5, type=T.TYPE_MESSAGE, type_name=".tbtest.Summary",
               label=T.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def _records(path):
  data = open(path, "rb").read()
  i = 0
  while i < len(data):
    header = data[i:i + 8]
    (n,), (crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[i + 8:i + 12])
    assert crc == _masked_crc(header)
    payload = data[i + 12:i + 12 + n]
    assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == _masked_crc(payload)
    yield payload
    i += 16 + n


def test_crc32c_known_answer():
  assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720, B.4)
  assert crc32c(b"") == 0


def test_metrics_reach_tensorboard_without_importing_torch(tmp_path):
  w = MetricsWriter(str(tmp_path / "ppo"))
  w.write(10, {"loss": 1.5, "kl": -0.25, "lr": 3e-4, "hist": [1, 2], "bad": float("nan")})
  w.write(20, {"loss": 0.75})
  w.close()
  files = glob.glob(str(tmp_path / "ppo" / "tensorboard" / "events.out.tfevents.*"))
  assert len(files) == 1
  Event = _event_class()
  events = [Event.FromString(p) for p in _records(files[0])]
  assert events[0].file_version == "brain.Event:2"
  got = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
  # Lists and non-finite values are not scalars TensorBoard can plot; they stay in metrics.jsonl.
  assert [s for s, _ in got] == [10, 20]
  assert got[0][1] == {"loss": 1.5, "kl": -0.25, "lr": struct.unpack("<f", struct.pack("<f", 3e-4))[0]}
  assert got[1][1] == {"loss": 0.75}
  assert "tensorboardX" not in sys.modules
  assert os.path.getsize(tmp_path / "ppo" / "metrics.jsonl") > 0
