"""The same ``convert`` command on N nodes: which shards this one runs.

Rank R of N runs the shards whose index is R modulo N, a rule every rank applies to the same
persisted plan without talking to the others. A rank skips shards already committed, so
re-running it resumes, and re-running with another N re-partitions whatever is not
committed. Whichever rank finds every shard committed assembles the dataset (finalisation is
idempotent: two ranks doing it write the same bytes).

N and R come from ``--num-nodes`` / ``--node-rank``, else from the launcher's environment:
Slurm's ``SLURM_NTASKS`` / ``SLURM_PROCID`` (``srun``), then ``WORLD_SIZE`` / ``RANK``
(torchrun and most others), else one node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from digi2real.config import Config

# (number of tasks, this task's rank) variables, in the order they are trusted
LAUNCHER_VARIABLES = (("SLURM_NTASKS", "SLURM_PROCID"), ("WORLD_SIZE", "RANK"))


@dataclass(frozen=True)
class NodeSplit:
    num_nodes: int = 1
    node_rank: int = 0

    @property
    def multi(self) -> bool:
        return self.num_nodes > 1

    def owns(self, shard: int) -> bool:
        return shard % self.num_nodes == self.node_rank

    def __str__(self) -> str:
        return f"rank {self.node_rank} of {self.num_nodes}"


def _from_environment(position: int) -> tuple[int | None, str]:
    for names in LAUNCHER_VARIABLES:
        text = os.environ.get(names[position])
        if text is not None and text.strip():
            try:
                return int(text), names[position]
            except ValueError:
                raise ValueError(f"{names[position]}={text!r} is not an integer") from None
    return None, ""


def node_split(config: Config) -> NodeSplit:
    """This process's place among the nodes of a run (see the module's docstring)."""
    num_nodes, num_from = config.run.num_nodes, "--num-nodes"
    node_rank, rank_from = config.run.node_rank, "--node-rank"
    if num_nodes is None:
        num_nodes, num_from = _from_environment(0)
    if node_rank is None:
        node_rank, rank_from = _from_environment(1)
    num_nodes = 1 if num_nodes is None else num_nodes
    node_rank = 0 if node_rank is None else node_rank
    if num_nodes < 1:
        raise ValueError(f"{num_from}={num_nodes}: the number of nodes must be >= 1")
    if not 0 <= node_rank < num_nodes:
        raise ValueError(
            f"{rank_from or '--node-rank'}={node_rank} is not a rank of "
            f"{num_from or '--num-nodes'}={num_nodes} nodes (valid: 0..{num_nodes - 1})"
        )
    return NodeSplit(num_nodes, node_rank)
