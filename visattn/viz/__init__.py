"""See what each block attends to: query maps, attention probabilities, receptive fields, plots, the explorer.

Imported only when used (``import visattn`` never imports it). The maps need torch alone; rendering
(:mod:`visattn.viz.render`), the bundled photos (:mod:`visattn.viz.images`) and the browser explorer
(:mod:`visattn.viz.server`) need the ``viz`` extra: ``pip install 'visattn[viz]'``.
"""

from .maps import (
    ERF,
    AttentionProbs,
    attention_probs,
    build_block,
    effective_receptive_field,
    feature_map,
    perturb_weights,
    query_map,
    to_grid,
)

__all__ = [
    "ERF",
    "AttentionProbs",
    "attention_probs",
    "build_block",
    "effective_receptive_field",
    "feature_map",
    "perturb_weights",
    "query_map",
    "to_grid",
]
