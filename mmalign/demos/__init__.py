"""Gradio demos (the ``[demo]`` extra): look at rewards, ReNO and training runs on the embedded world or on real
checkpoints. ``mmalign demo NAME`` launches one; each ``build_*`` returns a ``gr.Blocks`` that tests call without
launching. gradio is imported only inside this package, so the rest of mmalign runs without it.
"""

from __future__ import annotations

__all__ = ["DEMOS", "require_gradio"]

#: demo name → what it shows (``mmalign.demos.app.build_demo`` builds each).
DEMOS: dict[str, str] = {
    "rewards": "generate or upload images; every reward scores them, gold verdicts drawn, pairs compared",
    "reno": "ReNO live on one prompt: the image and the reward curve every iteration, a stop button",
    "compare": "a run's aligned model beside its base: same prompts and seeds, gold, trained reward, Vendi",
}

INSTALL_HINT = 'pip install "mmalign[demo]"'


def require_gradio():
    """The ``gradio`` module, or an ``ImportError`` whose one line says how to install it."""
    try:
        import gradio
    except ImportError as err:
        raise ImportError(f"the demos need gradio, which is not installed ({err}); {INSTALL_HINT}") from None
    return gradio
