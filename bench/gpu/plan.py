"""How big each part of the GPU check is: the full run, the quick run and the CPU smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MixedCell:
    """A SARATHI-like step: ``num_decodes`` decodes at ``context_tokens`` plus one prefill chunk."""

    num_decodes: int
    context_tokens: int
    chunk_tokens: int


@dataclass(frozen=True)
class CheckPlan:
    """The defaults are the full run; ``quick`` and ``smoke`` say only what they change."""

    mode: str = "full"
    """``full``, ``quick`` or ``smoke``: recorded in the report."""
    parity_shapes: tuple[str, ...] = ("llama-3.2-1b",)
    """Random checkpoints (``workers.random_model.SHAPES``) compared with transformers besides the tiny
    test model, which is always compared."""
    parity_tokens: int = 64
    timing_shapes: tuple[str, ...] = ("llama-3-8b", "llama-3.2-1b")
    """Shapes whose step times are measured and fitted into a profile, in this order (the 8B first: it
    is the simulator's model)."""
    decode_batches: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    context_tokens: tuple[int, ...] = (512, 2048)
    chunk_tokens: tuple[int, ...] = (256, 512, 2048)
    """Prefill chunks timed from position 0 and, if shorter than the longest context, as the last chunk
    of a prompt of that context (the paged-gather path a later SARATHI chunk takes)."""
    mixed_cells: tuple[MixedCell, ...] = (
        MixedCell(8, 512, 256),
        MixedCell(32, 2048, 512),
        MixedCell(64, 512, 512),
    )
    num_steps: int = 10
    num_warmup: int = 2
    roofline_batches: tuple[int, ...] = (1, 64)
    """Batches whose fraction of the HBM roofline is reported and whose step the profiler splits."""
    budget_s: float = 330.0
    """A part that would start after this much wall time is skipped (and recorded as such), so the
    JSON always comes back inside the machine's lease."""

    @classmethod
    def full(cls) -> CheckPlan:
        return cls()

    @classmethod
    def quick(cls) -> CheckPlan:
        """The 8B and 1B step times on a coarser grid, no random-checkpoint parity."""
        return cls(
            mode="quick",
            parity_shapes=(),
            parity_tokens=32,
            decode_batches=(1, 8, 64, 256),
            chunk_tokens=(256, 2048),
            mixed_cells=(MixedCell(32, 2048, 512),),
            num_steps=5,
            num_warmup=1,
            budget_s=150.0,
        )

    @classmethod
    def smoke(cls) -> CheckPlan:
        """Every code path on a CPU in seconds: stand-in shapes, a tiny grid (the test suite runs it)."""
        return cls(
            mode="smoke",
            parity_shapes=("smoke-1b",),
            parity_tokens=16,
            timing_shapes=("smoke-8b", "smoke-1b"),
            decode_batches=(1, 4),
            context_tokens=(32, 96),
            chunk_tokens=(16, 64),
            mixed_cells=(MixedCell(4, 64, 16),),
            num_steps=2,
            num_warmup=1,
            roofline_batches=(1, 4),
            budget_s=300.0,
        )
