"""Schedules over a run: the learning rate, and phases of values (the SAE's L1 coefficient, the reward weights).

A phase schedule is written RATIO:VALUE[/VALUE...] phases separated by commas, e.g. the SAE's
'0.2:0.001,0.6:0.01,0.2:0.001' or the reward's '2:0.5/0.3/0.2,6:0.4/0.3/0.3,2:0.3/0.2/0.5'; the
ratios are normalised to fractions of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.errors import ConfigError


def lr_at(step: int, total: int, base_lr: float, warmup_frac: float, decay_frac: float, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup_frac` of the steps, constant, then linear decay over the last
    `decay_frac` of the run down to `floor` × base_lr."""
    warm = max(1, int(warmup_frac * total))
    decay_start = int((1 - decay_frac) * total)
    if step < warm:
        return base_lr * (step + 1) / warm
    if decay_frac > 0 and step >= decay_start:
        remaining = max(0.0, (total - step) / max(1, total - decay_start))
        return base_lr * (floor + (1 - floor) * remaining)
    return base_lr


@dataclass(frozen=True)
class Phase:
    fraction: float
    """Share of the run this phase lasts (the phases' fractions sum to 1)."""
    values: tuple[float, ...]


def parse_phases(text: str, flag: str, names: tuple[str, ...]) -> list[Phase]:
    """RATIO:V1/V2/... phases (one value per name) → phases whose fractions sum to 1.

    Ratios must be > 0 and values >= 0; a malformed phase is a ConfigError naming `flag` and the form."""
    form = "RATIO:" + "/".join(n.upper() for n in names)
    phases = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            ratio, rest = part.split(":")
            values = tuple(float(v) for v in rest.split("/"))
            ratio_value = float(ratio)
        except ValueError:
            raise ConfigError(f"{flag}: expected {form} phases separated by commas, got {part!r}") from None
        if len(values) != len(names):
            raise ConfigError(f"{flag}: expected {form} phases separated by commas, got {part!r}")
        if ratio_value <= 0 or min(values) < 0:
            raise ConfigError(f"{flag}: ratios must be > 0 and values >= 0, got {part!r}")
        phases.append((ratio_value, values))
    if not phases:
        raise ConfigError(f"{flag}: no phase given")
    total = sum(r for r, _ in phases)
    return [Phase(r / total, v) for r, v in phases]


def phase_index(phases: list[Phase], step: int, total: int) -> int:
    """The phase that `step` of `total` falls in (steps past the end stay in the last phase)."""
    frac, edge = step / max(1, total), 0.0
    for i, phase in enumerate(phases):
        edge += phase.fraction
        if frac < edge:
            return i
    return len(phases) - 1
