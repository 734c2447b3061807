"""Loader determinism, sharding, resumption, workers, multi-task, evaluation."""

import json

import numpy as np
import pytest

import input_pipeline as ip
from input_pipeline import synthetic


class _IdSource:
  """In-memory source whose records say which index they came from."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"id": np.int64(i)}


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  return synthetic.write_nyu(str(out), num_train=10, num_test=3, height=48,
                             width=64)


def _options(**kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return ip.LoaderOptions(**kw)


def _depth(nyu, **kw):
  return ip.make_depth_loader(ip.NyuDepthSource(nyu), train=True,
                              crop_size=(32, 32),
                              options=_options(global_batch_size=2, **kw))


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_same_seed_same_batches_other_seed_differs(nyu):
  first = _take(_depth(nyu, seed=3), 6)  # 6 batches of 2 > 10 records: 2 epochs
  _assert_same(first, _take(_depth(nyu, seed=3), 6))
  other = _take(_depth(nyu, seed=4), 6)
  assert not all(np.array_equal(a["image"], b["image"])
                 for a, b in zip(first, other))
  assert first[0]["image"].shape == (2, 32, 32, 3)
  assert first[0]["depth"].shape == (2, 32, 32, 1)


def test_processes_read_disjoint_shares_and_batches_sum():
  n, count, global_batch = 23, 3, 6
  seen = []
  for index in range(count):
    loader = ip.make_loader(_IdSource(n), [], train=True, options=_options(
        global_batch_size=global_batch, num_epochs=1, process_index=index,
        process_count=count))
    assert loader.batch_size == global_batch // count
    ids = np.concatenate([b["id"] for b in loader])
    share = n // count  # 7: each process reads only its contiguous share
    assert set(ids.tolist()) <= set(range(index * share, (index + 1) * share))
    assert len(set(ids.tolist())) == len(ids) == 6  # 3 whole batches of 2
    seen.append(set(ids.tolist()))
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])


def test_epochs_reshuffle_and_cover_the_share():
  loader = ip.make_loader(_IdSource(8), [], train=True, options=_options(
      global_batch_size=4, num_epochs=2, seed=1))
  epochs = np.concatenate([b["id"] for b in loader]).reshape(2, 8)
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8))
  assert not np.array_equal(epochs[0], epochs[1])


def test_restored_state_gives_exactly_the_next_batch(nyu):
  loader = _depth(nyu, seed=7)
  _take(loader, 3)
  state = json.loads(json.dumps(loader.get_state()))
  expected = _take(loader, 2)
  restored = _depth(nyu, seed=7)
  restored.set_state(state)
  _assert_same(expected, _take(restored, 2))


def test_workers_give_the_same_batches_and_resume_across_worker_counts(nyu):
  reference = _take(_depth(nyu, seed=5), 5)
  with _depth(nyu, seed=5, worker_count=2) as loader:
    got = _take(loader, 3)
    state = loader.get_state()
  _assert_same(reference[:3], got)
  resumed = _depth(nyu, seed=5)  # no workers now
  resumed.set_state(state)
  _assert_same(reference[3:], _take(resumed, 2))


def test_multitask_loader_steps_every_task_and_restores(nyu):
  def build():
    return ip.make_multitask_loader({
        "depth": _depth(nyu, seed=1),
        "ids": ip.make_loader(_IdSource(9), [], train=True,
                              options=_options(global_batch_size=3)),
    })
  loader = build()
  first = next(loader)
  assert set(first) == {"depth", "ids"} and first["ids"]["id"].shape == (3,)
  state = loader.get_state()
  expected = next(loader)
  restored = build()
  restored.set_state(state)
  again = next(restored)
  for task in expected:
    _assert_same([expected[task]], [again[task]])


def test_evaluation_is_ordered_padded_and_marks_validity(nyu):
  # 3 test frames, global batch 4 over 2 processes: 2 per process, 1 batch each.
  seen = []
  for index in range(2):
    loader = ip.make_depth_loader(
        ip.NyuDepthSource(nyu, split="test"), train=False,
        options=_options(global_batch_size=4, process_index=index,
                         process_count=2))
    batches = list(loader)
    assert loader.num_batches == len(batches) == 1
    assert batches[0]["image"].shape == (2, 48, 64, 3)
    seen.append(batches[0]["valid"])
  np.testing.assert_array_equal(np.concatenate(seen), [True, True, True, False])


def test_every_fourth_training_sample_carries_the_stripe():
  class Flat:
    def __len__(self):
      return 8

    def __getitem__(self, i):
      return {"image": np.zeros((4, 40, 3), np.uint8),
              "depth": np.full((4, 40), 1.0, np.float32)}

  from input_pipeline import transforms_depth as td
  loader = ip.make_loader(Flat(), [td.DepthStripe(), td.ToFloat()], train=True,
                          options=_options(global_batch_size=8))
  striped = (next(loader)["image"] > 0).any(axis=(1, 2, 3))
  np.testing.assert_array_equal(striped, [i % 4 == 0 for i in range(8)])


def test_batch_not_divisible_by_processes_is_an_error():
  with pytest.raises(ValueError, match="divisible"):
    ip.make_loader(_IdSource(8), [], train=True, options=_options(
        global_batch_size=5, process_index=0, process_count=2))
