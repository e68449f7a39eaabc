"""promptd: continuous prompt improvement for production LLM applications.

Apps import only this package: the event models and the routing hash. Importing it
must stay cheap (no scipy, litellm or aiosqlite).
"""

from promptd.events import FeedbackEvent, MetricEvent

__version__ = "0.1.0"

__all__ = ["FeedbackEvent", "MetricEvent", "__version__"]
