"""A RULER-style suite (Hsieh et al., 2024) scored on what the model generates: `tasks` (the task
registry, retrieval and tracing generators), `aggregation` (common and frequent words), `documents`
(token-exact prompts, chat template included), `suite` (settings, batched greedy generation with the
KV cache, string-match scoring)."""

from fitness.ruler import aggregation  # noqa: F401  (registers cwe and fwe)
from fitness.ruler.suite import RulerResults, RulerSettings, build_suite, evaluate_ruler  # noqa: F401
from fitness.ruler.tasks import RULER_TASKS  # noqa: F401
