"""The planner's pipeline-parallel model: bubble, stage split, activations in flight, p2p volume.

Stages and placement are the trainer's (parallel/pipeline_layout.py: the balanced split counts the embedding
and the head + loss as one layer each; loop or V placement). m = micro-batches per step on a rank, V = model
chunks (virtual stages) per rank.

Bubble (idle fraction of a step):
    gpipe, 1f1b                      (pp - 1) / (m + pp - 1)
    interleaved_1f1b                 (pp - 1) / (V m + pp - 1)            (Megatron's interleaved schedule)
    interleaved_zb, zbv, dualpipev   (pp - 1) / (3 V m + pp - 1)          (splitting backward into input and
                                     weight gradients fills about 2/3 of the interleaved bubble; ZB-H1, ZB-V)
Activations in flight on pp rank r, in micro-batches of that rank's layers (its saved activations of one
micro-batch times this):
    gpipe          m
    1f1b           min(m, pp - r)
    interleaved_*  min(m V, 2 (pp - r - 1) + (V - 1) pp + 1) / V   (Megatron's warm-up micro-batches + 1)
    zbv            min(m, pp)       (ZB-V keeps 1F1B's peak)
    dualpipev      min(m, pp + 1)   (DualPipe: one more than 1F1B)
P2P: each micro-batch crosses S - 1 stage boundaries forward (the residual stream, t/tp x h x a bytes, plus
2E+1 fp32 statistics) and back (its gradient); a rank sends V times that per micro-batch in each direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from minimax_train.parallel.pipeline_layout import SCHEDULES

ZERO_BUBBLE = ("interleaved_zb", "zbv", "dualpipev")


def bubble_fraction(schedule: str, pp: int, m: int, v: int = 1) -> float:
    if pp <= 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (m + pp - 1)
    work = v * m * (3 if schedule in ZERO_BUBBLE else 1)
    return (pp - 1) / (work + pp - 1)


def in_flight(schedule: str, pp: int, m: int, v: int, rank: int) -> float:
    """Micro-batches of rank `rank`'s layers whose activations are alive at its peak."""
    if pp <= 1 or schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(m, pp - rank))
    if schedule in ("interleaved_1f1b", "interleaved_zb"):
        return min(m * v, 2 * (pp - rank - 1) + (v - 1) * pp + 1) / v
    if schedule == "zbv":
        return float(min(m, pp))
    return float(min(m, pp + 1))  # dualpipev


@dataclass(frozen=True)
class RankShare:
    """What pp rank `rank` holds: its decoder layers, the embedding, the final norm + lm_head + loss."""

    rank: int
    layers: int
    embedding: bool
    head: bool


def rank_shares(num_layers: int, pp: int, schedule: str, v: int) -> list[RankShare]:
    """Every pp rank's share under the trainer's balanced split and placement."""
    from minimax_train.parallel.layout import ParallelConfig
    from minimax_train.parallel.pipeline_layout import pipeline_stages

    if pp == 1:
        return [RankShare(0, num_layers, True, True)]
    stages = pipeline_stages(ParallelConfig(pp=pp, pp_schedule=schedule, pp_virtual_stages=v), num_layers)
    out = []
    for r in range(pp):
        mine = [s for s in stages if s.rank == r]
        out.append(
            RankShare(r, sum(len(s.layers) for s in mine), any(s.is_first for s in mine), any(s.is_last for s in mine))
        )
    return out


def p2p_bytes_per_rank(pp: int, v: int, m: int, tokens: float, hidden: int, act_bytes: int, experts: int) -> float:
    """Bytes one pp rank sends per step (activations forward, their gradients backward)."""
    if pp <= 1:
        return 0.0
    per_mb = tokens * hidden * act_bytes + (2 * experts + 1) * 4
    return 2.0 * v * m * per_mb


def virtual_stages_for(schedule: str, v: int) -> int:
    _, per_rank, _ = SCHEDULES[schedule]
    if v:
        return v
    return 1 if per_rank == 1 else 2


__all__ = ["RankShare", "bubble_fraction", "in_flight", "p2p_bytes_per_rank", "rank_shares", "virtual_stages_for"]
