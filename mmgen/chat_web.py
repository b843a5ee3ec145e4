"""The browser chat (`mmgen-chat --web`): a Gradio app around `mmgen.chat_session.ChatSession`.

Layout: a chat box (streaming text, generated images inline), a multimodal input (text + image upload),
a settings panel (steps, guidance, seed, temperature, "start the reply with an image"), and a gallery of
the images this browser session generated. Each browser session gets its own `ChatSession` (sharing the
one model) writing to `<out>/session-NNN/`. The handlers below are plain functions of plain values, so
tests drive them without a browser; `build_app` only wires them to components.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from mmgen.chat_session import ChatError, ChatSession, Settings
from mmgen.extras import require

_EMPTY_INPUT = {"text": "", "files": []}


def require_gradio():
    """gradio, or a one-line error naming the 'web' extra that installs it."""
    return require("gradio", "the web chat (mmgen-chat --web)")


def session_factory(template: ChatSession) -> Callable[[], ChatSession]:
    """New ChatSessions on the template's model, each with its own numbered output folder."""
    counter = itertools.count(1)

    def make() -> ChatSession:
        settings = Settings(**vars(template.settings))
        out = template.out_dir / f"session-{next(counter):03d}"
        return ChatSession(template.model, template.processor, out_dir=out, settings=settings,
                           model_name=template.model_name)  # fmt: skip

    return make


def _file_path(f) -> str:
    return f["path"] if isinstance(f, dict) else str(f)


def gallery_items(session: ChatSession | None) -> list[tuple[str, str]]:
    """(path, caption) of every image this session generated, oldest first."""
    return [] if session is None else [(p, Path(p).name) for p in session.images]


def respond(message, history, steps, guidance, seed, temperature, force_image, session, *, new_session):
    """One user turn: yields (input box value, chat history, gallery, session) as the reply streams.

    message: {"text": str, "files": [paths]} from the multimodal box; history: Gradio messages
    ({"role", "content"}; content is text or {"path": ...} for an image). Problems with the input
    (a bad setting, a non-image or too large upload, an over-long prompt) and a reply that cannot be
    saved become an assistant message "Error: ..." (the terminal's message) and the conversation goes on.
    """
    session = session or new_session()
    history = list(history or [])
    message = message or _EMPTY_INPUT
    text, files = (message.get("text") or "").strip(), [_file_path(f) for f in message.get("files") or []]
    shown = [{"role": "user", "content": {"path": f}} for f in files]
    shown += [{"role": "user", "content": text}] if text else []
    try:
        for name, value in (
            ("steps", steps),
            ("cfg", guidance),
            ("seed", seed),
            ("temperature", temperature),
        ):
            session.settings.change(name, value)  # slider values arrive as floats
        for f in files:
            session.attach(f)
        events = session.reply(text, force_image=bool(force_image))
    except ChatError as e:
        session.attachments = []
        history += shown + [{"role": "assistant", "content": f"Error: {e}"}]
        yield _EMPTY_INPUT, history, gallery_items(session), session
        return
    history += shown
    yield _EMPTY_INPUT, history, gallery_items(session), session
    try:
        for ev in events:
            history = _show(ev, history, session)
            yield _EMPTY_INPUT, history, gallery_items(session), session
    except ChatError as e:  # e.g. the output folder cannot be written
        history.append({"role": "assistant", "content": f"Error: {e}"})
        yield _EMPTY_INPUT, history, gallery_items(session), session


def _show(ev, history: list, session: ChatSession) -> list:
    """`history` with one reply event added: text joins the assistant's last text message."""
    if ev.kind == "text":
        last = history[-1]
        if last["role"] == "assistant" and isinstance(last["content"], str):
            history[-1] = {"role": "assistant", "content": last["content"] + ev.value}
        else:
            history.append({"role": "assistant", "content": ev.value})
    elif ev.kind == "image":
        history.append({"role": "assistant", "content": {"path": ev.value}})
    elif ev.value == "length":
        note = f"(reply cut at max_new_tokens={session.settings.max_new_tokens})"
        history.append({"role": "assistant", "content": note})
    return history


def reset(session):
    """Forget the conversation (the gallery keeps this session's images)."""
    if session is not None:
        session.reset()
    return [], gallery_items(session), session


def build_app(template: ChatSession):
    """The gr.Blocks app. Elements the tests find: #chat, #prompt, #force-image, #gallery, #settings."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    gr = require_gradio()

    s = template.settings
    new_session = session_factory(template)

    def on_submit(message, history, steps, guidance, seed, temperature, force_image, session) -> Iterator:
        yield from respond(message, history, steps, guidance, seed, temperature, force_image, session,
                           new_session=new_session)  # fmt: skip

    with gr.Blocks(title="mmgen chat", analytics_enabled=False) as demo:
        gr.Markdown(f"### mmgen chat\nModel: `{template.model_name}`")
        session = gr.State(None)  # a ChatSession per browser session, made on its first message
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="chat", label="Conversation", height=480, render_markdown=False,
                                  feedback_options=None)  # fmt: skip
                box = gr.MultimodalTextbox(
                    elem_id="prompt", file_types=["image"], file_count="multiple", show_label=False,
                    placeholder="Type a message (attach images with the clip), Enter to send",
                )  # fmt: skip
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("New conversation", elem_id="reset")
            with gr.Column(scale=1, elem_id="settings"):
                steps = gr.Slider(1, 16, value=s.num_steps, step=1, label="Image steps")
                guidance = gr.Slider(0.0, 10.0, value=s.guidance, step=0.5, label="Guidance (1 = off)")
                seed = gr.Number(value=s.seed, precision=0, minimum=0, label="Seed")
                temperature = gr.Slider(
                    0.0, 2.0, value=s.temperature, step=0.05, label="Temperature (0 = greedy)"
                )
                force = gr.Checkbox(value=False, label="Start the reply with an image", elem_id="force-image")
                gallery = gr.Gallery(label="This session's images", elem_id="gallery", columns=3, height=320)
        event = box.submit(
            on_submit, [box, chat, steps, guidance, seed, temperature, force, session],
            [box, chat, gallery, session], concurrency_limit=1,  # one model, one reply at a time
        )  # fmt: skip
        stop.click(None, None, None, cancels=[event])
        clear.click(reset, [session], [chat, gallery, session])
    return demo


def launch(template: ChatSession, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the app on host:port (127.0.0.1 by default: reachable from this machine only)."""
    template.out_dir.mkdir(parents=True, exist_ok=True)
    demo = build_app(template)
    demo.queue().launch(
        server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
        allowed_paths=[str(template.out_dir.resolve())],  # the generated images are served from there
    )  # fmt: skip
    return demo
