"""Two local processes with two CPU devices each train like one process with four.

Both runs use two data shards (`data.num_shards=2`): in the two-process run each process
reads its own shard and feeds its rows of the global batch; in the one-process run the
single process reads both. `jax.distributed.initialize` runs on localhost (gloo CPU
collectives) through the entry point's environment variables.
"""

import socket
import subprocess
import sys

import pytest

from ait_jax.train import testing

STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  return testing.make_workspace(str(tmp_path_factory.mktemp("multihost")))


def _flags(workspace):
  return testing.tiny_flags(workspace, total_steps=STEPS, **{
      "data.num_shards": 2, "checkpoint.every_steps": STEPS, "eval_at_end": True,
      "tasks.depth.eval_batch_size": 4, "tasks.depth.eval_max_batches": 1,
      "tasks.depth.eval_baseline": False})


def test_two_processes_match_one(workspace, tmp_path):
  single = str(tmp_path / "single")
  testing.run_main(single, _flags(workspace), testing.subprocess_env(workspace, 4))

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = []
  for pid in range(2):
    env = testing.subprocess_env(workspace, 2, AIT_COORDINATOR=f"127.0.0.1:{port}",
                                 AIT_NUM_PROCESSES=2, AIT_PROCESS_ID=pid)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "ait_jax.main", f"--workdir={multi}", *_flags(workspace)],
        cwd=testing.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-6000:]

  want = [m["loss"] for m in testing.read_metrics(single)]
  got = [m["loss"] for m in testing.read_metrics(multi)]
  assert len(want) == len(got) == STEPS
  for a, b in zip(got, want):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (got, want)
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  evals = [json.load(open(os.path.join(d, "eval", f"step_{STEPS:08d}.json")))
           for d in (single, multi)]
  assert abs(evals[0]["depth/rmse"] - evals[1]["depth/rmse"]) < 1e-4
