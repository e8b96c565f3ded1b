"""Integrations with the trainers people use (optional imports).

- ``exactlr.integrations.lightning``: a Lightning ``Callback``.
- ``exactlr.integrations.transformers``: a Hugging Face ``TrainerCallback``.
"""
