"""How a sweep entry is named on disk: one key for result files and pruned checkpoints.

An entry is (model, calibration, criterion, experts removed per layer). The criterion key
is its point ``S_<b>_<alpha>_<beta>`` whatever its name ("man" and "S(1,0,1)" share
``S_1_0_1``), or the name of a criterion outside the family (``mone``); ``removed<n>`` is the
exact number of experts removed in every MoE layer (``removed4-4-3-4`` when layers differ),
never a rounded ratio.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..criteria import Criterion, StatisticCriterion, get_criterion

UNPRUNED = "unpruned"
NO_CALIBRATION = "none"


def slug(text: str) -> str:
    """A file-name-safe form: ``S(0,2,1)`` -> ``S_0_2_1``, ``embedded:code`` -> ``embedded-code``,
    ``embedded:mixed@seed1`` (a calibration draw) -> ``embedded-mixed-seed1``."""
    text = str(text).replace(":", "-").replace("@", "-").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def criterion_key(criterion: Criterion | StatisticCriterion | str | tuple) -> str:
    """What identifies a criterion in paths: ``S_1_0_1`` for a point of the family (named or
    not), the name for one outside it (``mone``), ``unpruned`` for the unpruned model."""
    if isinstance(criterion, str) and criterion == UNPRUNED:
        return UNPRUNED
    try:
        c = get_criterion(criterion)
    except ValueError:
        return slug(criterion)
    if c.point is None:
        return slug(c.name)
    return "S_{}_{}_{}".format(*c.point)


def removed_tag(removed: int | Sequence[int]) -> str:
    """``removed4`` when every layer loses 4 experts, ``removed4-4-3-4`` when layers differ."""
    counts = [removed] if isinstance(removed, (int, float)) else list(removed)
    if any(isinstance(n, float) or int(n) != n or n < 0 for n in counts):
        raise ValueError(f"removed={removed!r}: a count of experts removed (per layer), not a ratio")
    counts = [int(n) for n in counts]
    if not counts or len(set(counts)) == 1:
        return f"removed{counts[0] if counts else 0}"
    return "removed" + "-".join(str(n) for n in counts)


def entry_folder(model: str, calibration: str, criterion, removed: int | Sequence[int]) -> Path:
    """``<model>/<calibration>/<criterion key>__removed<n>``, relative to a results or checkpoints root."""
    return Path(slug(model)) / slug(calibration) / f"{criterion_key(criterion)}__{removed_tag(removed)}"
