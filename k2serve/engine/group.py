"""What the engine loop needs of a lockstep group: ranks that each own an engine and step together.

Expert parallelism (`k2serve.experts.EPWorker`) is the implementation: every rank holds a share of the
routed experts, so each forward is a collective and every rank must call `step()` each iteration,
with or without work of its own. `AsyncEngine.for_group` drives one rank through this contract.
"""

from __future__ import annotations

from typing import Protocol

from k2serve.engine.llm_engine import LLMEngine, RequestOutput


class GroupLostError(RuntimeError):
    """The group can step no more (a rank died or hung); fatal for every rank of it, never repaired."""


class LockstepGroup(Protocol):
    """One rank of a group.

    - `engine` is this rank's engine: requests are added to and aborted on it as on a lone engine;
    - `step()` is the group's collective step: it returns this rank's outputs, or raises
      GroupLostError once the group is lost (every later call fails the same way);
    - `any_work` says whether any rank of the group had work in the last step.
    """

    engine: LLMEngine
    any_work: bool

    def step(self) -> list[RequestOutput]: ...
