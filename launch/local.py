"""Run a multi-process job on this machine (CPU), e.g. to try multi-host code paths.

  python launch/local.py --processes 2 --devices 2 -- --config configs/X.py \
      --workdir DIR [--config.a.b=value ...]

Starts `--processes` copies of `python -m ait_jax.main` with `--devices` simulated CPU
devices each, joined through `jax.distributed.initialize` on localhost (gloo
collectives). Output lines are prefixed with the process index; if one process fails,
the others are stopped and the launcher exits with its status. Ctrl-C (or SIGTERM)
is passed on as SIGTERM, so the run saves a checkpoint before it exits.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(prefix: str, stream) -> None:
  for line in stream:
    sys.stdout.write(f"[{prefix}] {line}")
    sys.stdout.flush()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=1, help="CPU devices per process")
  parser.add_argument("args", nargs=argparse.REMAINDER,
                      help="arguments of ait_jax.main (after --)")
  opts = parser.parse_args()
  args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
  port = _free_port()
  procs = []
  for index in range(opts.processes):
    env = dict(os.environ)
    env.update(AIT_COORDINATOR=f"127.0.0.1:{port}",
               AIT_NUM_PROCESSES=str(opts.processes), AIT_PROCESS_ID=str(index),
               JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={opts.devices}",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "ait_jax.main", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    threading.Thread(target=_pump, args=(str(index), proc.stdout), daemon=True).start()
    procs.append(proc)

  def forward(signum, frame):
    del frame
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)
  status = 0
  remaining = list(procs)
  while remaining:
    for proc in list(remaining):
      try:
        code = proc.wait(timeout=0.5)
      except subprocess.TimeoutExpired:
        continue
      remaining.remove(proc)
      if code and not status:
        status = code
        for other in remaining:
          other.kill()
  return status


if __name__ == "__main__":
  sys.exit(main())
