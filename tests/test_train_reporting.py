"""Metrics files: TensorBoard event records (CRCs, protobuf layout) and metrics.jsonl."""

import json
import struct

from ait_jax.train import reporting, tensorboard


def test_crc32c_known_values():
  # RFC 3720 test vectors.
  assert tensorboard.crc32c(b"") == 0
  assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA
  assert tensorboard.crc32c(b"123456789") == 0xE3069283


def test_event_file_round_trip(tmp_path):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  writer.scalars(3, {"train/loss": 2.5, "train/lr": 1e-4})
  writer.scalars(300, {"eval/rmse": 0.25})
  writer.close()
  got = tensorboard.read_scalars(writer.path)
  assert [(s, t) for s, t, _ in got] == [(3, "train/loss"), (3, "train/lr"),
                                         (300, "eval/rmse")]
  assert [v for _, _, v in got] == [2.5, struct.unpack("<f", struct.pack("<f", 1e-4))[0],
                                    0.25]


def test_reporter_writes_jsonl_eval_and_truncates(tmp_path):
  rep = reporting.Reporter(str(tmp_path), 4, progress_bar=False)
  rep.start(0)
  for step in range(1, 5):
    rep.train(step, {"loss": 1.0 / step})
  path = rep.eval(4, {"depth/rmse": 0.5})
  rep.close()
  lines = [json.loads(l) for l in open(tmp_path / reporting.METRICS_FILE)]
  assert [l["step"] for l in lines] == [1, 2, 3, 4] and lines[1]["loss"] == 0.5
  assert json.load(open(path)) == {"step": 4, "depth/rmse": 0.5}
  reporting.truncate_metrics(str(tmp_path), 2)
  assert [json.loads(l)["step"] for l in open(tmp_path / reporting.METRICS_FILE)] == [1, 2]
