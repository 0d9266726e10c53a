"""Which prompt to prefill next: the scheduling policy of a server's running batch.

A GLM prompt attends both ways, so it cannot be prefilled a few tokens at a time; it can be
prefilled a few layers at a time. Several prompt groups may be in flight at once (one per step in
which requests arrived). A step has a budget of `chunk` prompt tokens' worth of layers
(`chunk * num_layers` token-layers; a layer of a group of width W costs W) and spends it so:

1. **no starvation**: every group that ran no layer in the previous step runs one now (the
   longest passed over first; nothing interrupts these), so no group is passed over two steps in
   a row and a prompt finishes within `2 * num_layers` steps however many others arrive;
2. **shortest remaining first**: then the group with the least work left runs, layer after
   layer, while the budget lasts (the step's first layer always runs). A short request that
   arrives during a long prompt's prefill therefore lands on the next step instead of waiting for
   the long one to finish. Once a group has landed, only groups that can land within what is
   left of the budget run, so that its first token is not held back by part of a long prefill;
3. **preemption**: after any layer of 2 the step ends when the caller says a request is waiting
   to join (`interrupt`), so a newcomer waits for the layer in progress (and, at most, one layer
   of each group that was passed over).

The policy knows nothing of tensors: `run_layer(key)` does the work, so tests can drive it with a
fake.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from glmgym.errors import GlmgymError

__all__ = ["PrefillScheduler"]

K = TypeVar("K", bound=Hashable)


@dataclass
class _Work:
    width: int  # tokens per layer (rows x padded prompt length)
    layers_left: int
    passed_over: int = 0  # steps in a row on which another group went instead

    @property
    def remaining(self) -> int:
        return self.width * self.layers_left


class PrefillScheduler(Generic[K]):
    """Prompt groups in flight through `num_layers` layers (see the module docstring).

    Args:
        num_layers: layers of the model.
        chunk: prompt tokens' worth of prefill per step: a group of width W runs at most
            max(1, chunk * num_layers // W) layers in one step.
    """

    def __init__(self, num_layers: int, chunk: int) -> None:
        if num_layers < 1 or chunk < 1:
            raise GlmgymError(f"num_layers and chunk must be at least 1, not {num_layers}, {chunk}")
        self.num_layers, self.chunk = num_layers, chunk
        self._work: dict[K, _Work] = {}  # in arrival order

    def __len__(self) -> int:
        return len(self._work)

    def __contains__(self, key: object) -> bool:
        return key in self._work

    def add(self, key: K, width: int) -> None:
        """A new group of `width` tokens per layer (rows x padded prompt length) to prefill."""
        if width < 1:
            raise GlmgymError(f"a prefill group needs at least one token, not {width}")
        self._work[key] = _Work(width, self.num_layers)

    def remove(self, key: K) -> None:
        """Drop a group (every row of it left): its remaining layers are not run."""
        self._work.pop(key, None)

    def step(self, run_layer: Callable[[K], None], interrupt: Callable[[], bool] | None = None) -> list[K]:
        """Spend one step's budget on the groups in flight (see the module docstring); the groups
        that went through their last layer, in the order they did.

        Args:
            run_layer: runs the next layer of the group it is given.
            interrupt: asked after each layer; True (a request is waiting to join) ends the step.
        """
        budget = self.chunk * self.num_layers
        spent, ran, landed = 0, set(), []
        due = sorted((k for k, w in self._work.items() if w.passed_over),
                     key=lambda k: -self._work[k].passed_over)  # stable: earliest first on ties
        try:
            for key in due:  # 1. one layer for every group passed over in the last step
                spent += self._layer(key, run_layer, landed)
                ran.add(key)
            while self._work:  # 2. shortest remaining first, within the budget
                key = min(self._work, key=lambda k: self._work[k].remaining)
                work = self._work[key]
                if (landed and work.remaining > budget - spent) or (ran and spent + work.width > budget):
                    break
                spent += self._layer(key, run_layer, landed)
                ran.add(key)
                if interrupt is not None and interrupt():  # 3. a newcomer: end the step here
                    break
            return landed
        finally:
            for key, work in self._work.items():
                work.passed_over = 0 if key in ran else work.passed_over + 1

    def _layer(self, key: K, run_layer: Callable[[K], None], landed: list[K]) -> int:
        """Run `key`'s next layer; its cost in token-layers."""
        run_layer(key)
        work = self._work[key]
        work.layers_left -= 1
        if not work.layers_left:
            del self._work[key]
            landed.append(key)
        return work.width
