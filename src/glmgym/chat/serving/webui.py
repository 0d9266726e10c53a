"""The web chat: a Gradio `ChatInterface` at /ui that streams through the server's engine."""

from __future__ import annotations

import secrets

from glmgym.chat.config import GenerationConfig
from glmgym.chat.serving.engine import Chunk, Done, Draining, Engine, QueueFull
from glmgym.errors import GlmgymError

__all__ = ["history_pairs", "mount_ui"]


def history_pairs(history) -> list[tuple[str, str]]:
    """Gradio's message list -> (user, assistant) pairs."""

    def text(content) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        return str(content or "")

    pairs, user = [], None
    for m in history or []:
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (m.role, m.content)
        if role == "user":
            user = text(content)
        elif role == "assistant" and user is not None:
            pairs.append((user, text(content)))
            user = None
    return pairs


def mount_ui(app, engine: Engine, api_key: str | None):
    """Mount the web chat on `app` at /ui (the API key, when set, is its password); returns the app."""
    import gradio as gr

    async def respond(message, history, max_length, top_p, temperature):
        query = message if isinstance(message, str) else str(message.get("text", ""))
        if not query.strip():
            return
        gen = {"max_length": int(max_length), "top_p": float(top_p), "temperature": float(temperature)}
        try:
            job = engine.chat(query, history_pairs(history), gen, trim_history=True)
        except QueueFull:
            raise gr.Error("The server is busy; try again in a moment.") from None
        except Draining:
            raise gr.Error("The server is shutting down.") from None
        except GlmgymError as exc:
            raise gr.Error(str(exc)) from None
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Chunk):
                    yield event.reply.response
                elif isinstance(event, Done):
                    return
                else:
                    raise gr.Error(event.message)
        finally:
            job.cancel()

    context, defaults = engine.bot.model.config.max_sequence_length, GenerationConfig()
    with gr.Blocks(title="ChatGLM-6B (glmgym)") as demo:
        gr.ChatInterface(
            respond,
            title="ChatGLM-6B",
            description=f"glmgym serving {engine.bot.name}. Replies stream as they are generated.",
            additional_inputs=[
                gr.Slider(16, context, value=min(defaults.max_length, context), step=1,
                          label="Maximum length", render=False),
                gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label="Top P", render=False),
                gr.Slider(0.01, 1.5, value=defaults.temperature, step=0.01, label="Temperature",
                          render=False),
            ],
            additional_inputs_accordion=gr.Accordion("Generation", open=True, render=False),
            concurrency_limit=engine.max_queue,
        )
    auth = None if api_key is None else (lambda user, password: secrets.compare_digest(password, api_key))
    return gr.mount_gradio_app(app, demo, path="/ui", auth=auth, footer_links=[])
