"""Train-state checkpoints with orbax: the state and the data position, saved together.

A checkpoint `WORKDIR/checkpoints/<step>/` holds two items:
* `state`: the train state (parameters, optimizer state, step), sharded arrays written
  by every process (orbax StandardSave), asynchronously if asked;
* `data`: the input pipeline's position, every data shard's loader state (JSON).

Restoring takes a target tree of `jax.ShapeDtypeStruct`s with shardings, so a
checkpoint restores onto any mesh or device count. An interrupted save leaves an
uncommitted temporary directory that `latest_step` and `restore` ignore.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run in `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving (all processes call this); returns once the arrays are copied."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))
    logging.info("checkpoint of step %d started in %s", step, self.directory)

  def restore(self, step: int, abstract_state, *, with_data: bool = True):
    """(state, data_state or None) of `step`, placed as `abstract_state`'s shardings."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], (restored["data"] if with_data else None)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or abstract values) with `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
