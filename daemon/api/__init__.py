"""The HTTP routes of each part: prompts and rollouts, pipelines, monitoring, optimization."""
