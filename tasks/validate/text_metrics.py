"""Task metrics of generated text against reference texts (labels): WER, CER and chrF.

Corpus-level, as speech and translation evaluations report them: WER and CER are the edit
distances summed over the corpus divided by the reference words/characters (so a long utterance
weighs more than a short one); chrF (Popović 2015, character 6-grams, beta = 2, whitespace
removed) averages the corpus n-gram precision and recall over the orders, then takes their
F-score, on a 0-100 scale, like sacreBLEU's default ``CHRF()``. Pure Python: no extra package.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

CHRF_ORDER = 6
CHRF_BETA = 2.0


def edit_distance(ref: Sequence[object], hyp: Sequence[object]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _check(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate: word edits / reference words (0 when every reference is empty)."""
    _check(refs, hyps)
    edits = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps, strict=True))
    words = sum(len(r.split()) for r in refs)
    return edits / words if words else float(edits > 0)


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate: character edits / reference characters (spaces count)."""
    _check(refs, hyps)
    norm = [(" ".join(r.split()), " ".join(h.split())) for r, h in zip(refs, hyps, strict=True)]
    edits = sum(edit_distance(r, h) for r, h in norm)
    chars = sum(len(r) for r, _ in norm)
    return edits / chars if chars else float(edits > 0)


def chrf(refs: Sequence[str], hyps: Sequence[str], order: int = CHRF_ORDER) -> float:
    """Corpus chrF (0-100): character n-gram F-score, recall weighted ``CHRF_BETA`` times."""
    _check(refs, hyps)
    stats = [[0, 0, 0] for _ in range(order)]  # per order: hyp n-grams, ref n-grams, common
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = re.sub(r"\s+", "", ref), re.sub(r"\s+", "", hyp)
        for n in range(1, order + 1):
            rc = Counter(r[i : i + n] for i in range(len(r) - n + 1))
            hc = Counter(h[i : i + n] for i in range(len(h) - n + 1))
            stats[n - 1][0] += sum(hc.values())
            stats[n - 1][1] += sum(rc.values())
            stats[n - 1][2] += sum((hc & rc).values())
    precision = recall = 0.0
    effective = 0
    for hyp_n, ref_n, common in stats:
        if hyp_n and ref_n:
            precision += common / hyp_n
            recall += common / ref_n
            effective += 1
    if not effective or precision + recall == 0:
        return 0.0
    precision, recall = precision / effective, recall / effective
    b2 = CHRF_BETA**2
    return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)


def task_metrics(kind: str, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """The metrics reported for a model kind: WER and CER for speech, chrF for text."""
    if kind == "speech":
        return {"wer": wer(refs, hyps), "cer": cer(refs, hyps)}
    return {"chrf": chrf(refs, hyps)}


# Which way is better, for "drop" (how much worse the candidate is than the source).
HIGHER_IS_BETTER = {"wer": False, "cer": False, "chrf": True}
