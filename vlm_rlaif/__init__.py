"""VLM-RLAIF: tuning video LMMs with reinforcement learning from AI feedback.

One module per step of the method; notebooks under notebooks/ orchestrate them.
"""

__version__ = "0.1.0"
