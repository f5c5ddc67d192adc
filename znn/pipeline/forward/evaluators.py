"""The forward evaluators dense inference can run a block with, by name."""

from __future__ import annotations

from znn.pipeline.forward.blockgraph import BlockForward
from znn.pipeline.forward.phases import PhaseForward

EVALUATORS = {"phases": PhaseForward, "graph": BlockForward}
