"""Chat with an mmgen model: `python -m mmgen.chat` / `mmgen-chat` (terminal), `--web` (Gradio), `--prompt` (scripts).

    mmgen-chat --model runs/default/final                 # multi-turn terminal chat (streams text)
    mmgen-chat --model DIR --prompt "Draw a red circle." --force-image --out out/   # one reply, then exit
    mmgen-chat --model DIR --web [--host 127.0.0.1 --port 7860]                       # browser UI

The conversation is `mmgen.chat_session.ChatSession`, which both front-ends share; the terminal is
`mmgen.chat_terminal`, the browser `mmgen.chat_web`. Bad input never ends the session; Ctrl-C during a
reply stops that reply (what was produced so far stays in the conversation) and keeps the session. The command line reports a bad argument as one line `error: ...`
with exit status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mmgen.chat_session import SETTINGS, ChatError, ChatSession, Settings, check_text, load_image
from mmgen.chat_terminal import Terminal, inline_image_protocol
from mmgen.cli import ArgumentParser, UsageError, run_cli
from mmgen.loading import check_device, check_model_source, load_export

DEFAULT_RUN_EXPORT = Path("runs/default/final")


def resolve_model(name: str | None, say) -> str | None:
    """`--model` as given, else the default run's export (saying so), else None after saying how to make one."""
    if name:
        return name
    final = DEFAULT_RUN_EXPORT  # relative to the working directory, where training/train.py writes it
    if (final / "config.json").is_file():
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime((final / "config.json").stat().st_mtime))
        say(f"No --model given: using the default run's export {final}/ (exported {stamp}).")
        return str(final)
    say(
        f"No --model given and no export of the default run at {DEFAULT_RUN_EXPORT}/. Make one with\n"
        "    accelerate launch training/train.py\n"
        "(it trains the embedded default run and exports it there), or pass --model DIR_OR_HUB_ID."
    )
    return None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mmgen-chat", description="Chat with an mmgen model (text and images).")
    p.add_argument("--model", help=f"model directory or Hub id (default: the export at {DEFAULT_RUN_EXPORT})")
    p.add_argument("--out", help="folder for generated images (default runs/chat/<timestamp>)")
    p.add_argument("--prompt", help="non-interactive: send this one message, print the reply, exit")
    p.add_argument("--image", action="append", default=[], help="with --prompt: attach an image (repeatable)")
    p.add_argument("--force-image", action="store_true", help="with --prompt: the reply starts with an image")
    p.add_argument("--steps", type=int, default=4, help="image refinement steps (default 4)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (default 1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-inline", action="store_true", help="never draw images inline in the terminal")
    p.add_argument("--web", action="store_true", help="launch the browser UI (Gradio) instead")
    p.add_argument("--host", default="127.0.0.1", help="--web: address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="--web: port (default 7860)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _settings_from(args) -> Settings:
    s = Settings(max_new_tokens=args.max_new_tokens)
    for name in SETTINGS:  # --steps, --cfg, --seed, --temperature
        s.change(name, getattr(args, name), prefix="--")
    if s.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if not 0 < args.port < 65536:
        raise ChatError(f"--port must be between 1 and 65535, got {args.port}")
    return s


def _check_out(out: Path) -> None:
    """UsageError unless generated images can be written under `out` (checked before the model loads)."""
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if existing == out and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if existing != out and not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {existing} is not writable")


def _one_shot(session: ChatSession, args, say) -> int:
    for path in args.image:
        session.attach(path)
    Terminal(session).stream(args.prompt or "", force_image=args.force_image)
    say(f"transcript saved: {session.save(session.out_dir / 'transcript.json')}")
    return 0


def main(argv=None) -> int:
    """`mmgen-chat`: exit status 0, 2 for a bad argument (one line `error: ...`), 130 after Ctrl-C."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # status lines; the reply goes to stdout
    # Undecodable bytes typed at the prompt arrive as escapes (and are refused with a message) instead of
    # raising inside input(); what is printed back never fails on them either.
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    settings = _settings_from(args)
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
    for path in args.image if args.prompt is not None else []:
        load_image(path)  # a bad --image fails before the model is loaded
    if args.web:
        from mmgen.chat_web import require_gradio

        require_gradio()  # a missing 'web' extra fails before the model loads
    out = Path(args.out) if args.out else Path("runs/chat") / time.strftime("%Y%m%d-%H%M%S")
    _check_out(out)
    name = resolve_model(args.model, say)
    if name is None:
        return 2
    check_model_source(name)
    check_device(args.device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars in the chat
    model, processor = load_export(name, args.device)
    session = ChatSession(model, processor, out_dir=out, settings=settings, model_name=name)
    if args.web:
        from mmgen.chat_web import launch

        try:
            launch(session, host=args.host, port=args.port)
        except OSError as e:  # the port is taken, the address is not this machine's
            raise UsageError(f"--host/--port: cannot serve on {args.host}:{args.port} ({e})") from None
        return 0
    if args.prompt is not None:
        try:
            return _one_shot(session, args, say)
        except KeyboardInterrupt:
            say("interrupted")
            return 130
    say(f"Model: {name}. Images are saved under {out}/")
    inline = None if args.no_inline or not sys.stdout.isatty() else inline_image_protocol()
    try:
        import readline  # noqa: F401  line editing and history for input()
    except ImportError:
        pass
    Terminal(session, inline=inline, debug=args.debug).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
