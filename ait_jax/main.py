"""Train, evaluate or predict with AiT or its tokenizers.

  python -m ait_jax.main --config configs/X.py --workdir DIR [--config.a.b=value ...]
      [--mode train|eval|predict] [--input PATH] [--output DIR]

The workdir holds, in fixed places: `config.json` (the resolved config),
`metrics.jsonl` (one JSON per logged step), `tensorboard/` (event files),
`checkpoints/` (orbax; a run resumes from the latest), `eval/` (one JSON per
evaluation, by step) and `predictions/` (predict mode). Predict mode writes the
test split's predictions, or with `--input` those of an image file or of a folder's
.jpg/.png images (sorted, not recursive; any size, no ground truth), named by the
images' stems, into `--output` (default DIR/predictions/); every process must see the
images, only process 0 writes. A stage-2 config whose tokenizer is missing and marked
`train_if_missing` trains it first into `DIR/tokenizer_<task>/`.

Multi-host: every process runs this command. The coordinator comes from
--coordinator/--num_processes/--process_id, from $AIT_COORDINATOR/...
(see ait_jax/parallel/distributed.py), or from the cluster (TPU pods, SLURM).
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to do.")
_INPUT = flags.DEFINE_string("input", None,
                             "--mode predict: an image file or a folder of images to "
                             "predict on, instead of the config's test split.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "--mode predict: where predictions go (default "
                              "WORKDIR/predictions).")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index.")
_LOCAL_DEVICES = flags.DEFINE_string("local_devices", "",
                                     "Comma-separated local device ids of this process.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax and grain (their warnings and errors pass)."""

  def filter(self, record):
    quiet = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))
    return record.levelno >= std_logging.WARNING or not quiet


def main(argv):
  del argv
  # Before any other JAX call.
  from ait_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _LOCAL_DEVICES.value)
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax.train import trainer  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  result = trainer.run(_CONFIG.value, _WORKDIR.value, _MODE.value,
                       input_path=_INPUT.value, output=_OUTPUT.value)
  if _MODE.value == "eval" and jax.process_index() == 0:
    print(result)
  elif _MODE.value == "predict" and jax.process_index() == 0:
    print(f"wrote {result} predictions under "
          f"{trainer.predictions_dir(_WORKDIR.value, _OUTPUT.value)}")


if __name__ == "__main__":
  app.run(main)
