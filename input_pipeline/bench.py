"""Images per second of the depth and instance-segmentation training pipelines.

  python -m input_pipeline.bench --task depth|insseg [--workers 0,1,2]
      [--batch-size 8] [--batches 20] [--data DIR]

Runs the training loader (reference resolutions: NYU 480x640 frames cropped to
480x480; COCO-like 480x640 images through large-scale jitter to 640x640) for
each worker count and prints one line per count. Without `--data`, synthetic
data (`input_pipeline.synthetic`) is generated in a temporary directory.
"""

import argparse
import os
import tempfile
import time

from input_pipeline import synthetic
from input_pipeline.loader import LoaderOptions
from input_pipeline.pipelines import make_depth_loader
from input_pipeline.pipelines import make_insseg_loader
from input_pipeline.sources_coco import CocoInstancesSource
from input_pipeline.sources_nyu import NyuDepthSource


def _loader(task: str, data: str, options: LoaderOptions):
  if task == "depth":
    source = NyuDepthSource(os.path.join(data, "nyu_depth_v2"))
    return make_depth_loader(source, train=True, options=options)
  coco = os.path.join(data, "coco")
  source = CocoInstancesSource(
      os.path.join(coco, "annotations", "instances_train2017.json"),
      os.path.join(coco, "train2017"))
  return make_insseg_loader(source, train=True, options=options)


def measure(task: str, data: str, workers: int, batch_size: int, batches: int,
            warmup: int, read_threads: int) -> float:
  """Images per second after `warmup` batches (worker start-up excluded)."""
  options = LoaderOptions(global_batch_size=batch_size, worker_count=workers,
                          read_threads=read_threads, process_index=0,
                          process_count=1)
  with _loader(task, data, options) as loader:
    for _ in range(warmup):
      next(loader)
    start = time.perf_counter()
    for _ in range(batches):
      next(loader)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", choices=("depth", "insseg"), required=True)
  parser.add_argument("--workers", default="0,1,2",
                      help="worker counts, comma-separated")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--read-threads", type=int, default=1)
  parser.add_argument("--data", help="directory with nyu_depth_v2/ and coco/")
  parser.add_argument("--num-images", type=int, default=32,
                      help="synthetic images to generate without --data")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    data = args.data
    if data is None:
      data = tmp
      if args.task == "depth":
        synthetic.write_nyu(tmp, args.num_images, 0)
      else:
        synthetic.write_coco(tmp, args.num_images, 0)
    for workers in (int(w) for w in args.workers.split(",")):
      rate = measure(args.task, data, workers, args.batch_size, args.batches,
                     args.warmup, args.read_threads)
      print(f"{args.task} workers={workers} batch={args.batch_size} "
            f"read_threads={args.read_threads}: {rate:.1f} images/s",
            flush=True)


if __name__ == "__main__":
  main()
