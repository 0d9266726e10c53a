"""glmgym: Decision Transformer agents for Gymnasium MuJoCo, and a ChatGLM-6B inference engine.

The top-level import is light on purpose: the pillars (`glmgym.agents`, later `glmgym.chat`)
import torch and their other heavy dependencies only when they are used.
"""

from glmgym.errors import GlmgymError

__all__ = ["GlmgymError", "__version__"]
__version__ = "0.1.0"
