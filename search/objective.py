"""What a stage's told value is, by name: the key its baselines rows and best-factors provenance store it
under, so a file says which perplexity it holds.

    needle_ppl  the long stage: needle PPL on the search documents (answer tokens only)
    text_ppl    the short stage: general-text PPL inside the window (search part of the text)
    text_ppl_ratio
                the short stage with `objective: worst_ratio`: the largest ratio, over the lengths, of
                that PPL to the model's own at the same length

Studies and run folders written before these names stored either as "fitness"; `objective_value` is
the one place that still reads that key.
"""

from __future__ import annotations

from collections.abc import Mapping

NEEDLE_PPL = "needle_ppl"
TEXT_PPL = "text_ppl"
TEXT_PPL_RATIO = "text_ppl_ratio"
# how plots and status name each
LABELS = {NEEDLE_PPL: "needle PPL (search documents)", TEXT_PPL: "general-text PPL",
          TEXT_PPL_RATIO: "general-text PPL / the model's own, worst length"}
LEGACY = "fitness"  # both stages' key before the rename: in committed results and users' old runs


def objective_value(row: Mapping) -> float | None:
    """The told value in a baselines row or a candidate's provenance, whichever stage (and release) wrote it;
    None when it holds none. A row holds one of these keys at most: their order does not matter."""
    for key in (NEEDLE_PPL, TEXT_PPL, TEXT_PPL_RATIO, LEGACY):
        if key in row:
            return row[key]
    return None
