"""Chat with an mmgen model: `python -m mmgen.chat` / `mmgen-chat` (terminal), `--web` (Gradio), `--prompt` (scripts).

    mmgen-chat --model runs/default/final                 # multi-turn terminal chat (streams text)
    mmgen-chat --model DIR --prompt "Draw a red circle." --force-image --out out/   # one reply, then exit
    mmgen-chat --model DIR --web [--host 127.0.0.1 --port 7860]                       # browser UI

`ChatSession` is the one piece both front-ends share: it keeps the conversation (messages
with PIL images for the model, a JSON transcript with image paths for people), checks inputs, runs
`mmgen.generation.generate_interleaved` and saves every generated image under the output folder as
`turnNNN-imageK.png` (turn number, image number within the reply), so names are deterministic.
Bad input (missing, unreadable, non-image or too large files, text that is not valid UTF-8, over-long
prompts, unknown commands, bad values) raises `ChatError` with a message for the user and never ends
the session; Ctrl-C during a reply stops that reply (what was produced so far stays in the
conversation) and keeps the session. The command line reports a bad argument as one line `error: ...`
with exit status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmgen.cli import ArgumentParser, UsageError, check_model_source, run_cli, text_problem

DEFAULT_RUN_EXPORT = Path("runs/default/final")
# The most pixels an attached image may have: any camera's photo fits; a decompression bomb (a few KB
# of PNG that decode to gigabytes) does not. The model sees images at its own small resolution anyway.
MAX_IMAGE_PIXELS = 8192 * 8192
HELP = """\
Type a message and press Enter. Commands:
  /image PATH       attach an image to your next message (repeat to attach several)
  /draw TEXT        send TEXT and make the reply start with an image
  /steps N          image refinement steps (flow-map jumps), e.g. 1, 2, 4, 8
  /cfg W            classifier-free guidance scale (1 = off)
  /seed S           random seed of the next replies
  /temperature T    text sampling temperature (0 = greedy)
  /settings         show the current settings
  /save FILE        write the conversation as JSON (text and image paths)
  /reset            forget the conversation (attachments included)
  /help             this text
  /quit             leave (or Ctrl-D). Ctrl-C stops a reply that is being generated."""


class ChatError(UsageError):
    """A problem with the user's input: shown to the user, the session goes on."""


@dataclass
class Settings:
    num_steps: int = 4
    guidance: float = 1.0
    seed: int = 0
    temperature: float = 0.0
    max_new_tokens: int = 256


@dataclass
class Event:
    """One piece of a reply: kind "text" (value = new text), "image" (value = saved path), "end" (reason)."""

    kind: str
    value: str


@dataclass
class _Turn:
    """The reply being built: model-facing content (PIL images) and transcript content (paths)."""

    parts: list = field(default_factory=list)
    record: list = field(default_factory=list)

    def add_text(self, text: str):
        for content in (self.parts, self.record):
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += text
            else:
                content.append({"type": "text", "text": text})

    def add_image(self, image, path: str):
        self.parts.append({"type": "image", "image": image})
        self.record.append({"type": "image", "path": path})


# ------------------------------------------------------------------------------------------ inputs


def load_image(path: str | os.PathLike):
    """Open an image file for attaching, fully decoded as RGB; ChatError names the file and what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not str(path).strip():
        raise ChatError("no image path given (usage: /image PATH)")
    p = Path(os.path.expanduser(str(path).strip().strip("'\"")))
    name = f"cannot attach {str(p)!r}"  # repr: undecodable bytes and control characters stay visible
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except (OSError, ValueError) as e:  # an embedded NUL, a name too long
        raise ChatError(f"{name}: not a usable path ({e})") from None
    if not exists:
        raise ChatError(f"{name}: no such file")
    if is_dir:
        raise ChatError(f"{name}: it is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(p) as im:
                _check_pixels(name, im.size)
                im.load()
                return im.convert("RGB")
    except ChatError:
        raise
    except Image.DecompressionBombError as e:  # over twice PIL's own limit: refused before we see the size
        size = _declared_size(p)
        if size is not None:
            _check_pixels(name, size)
        raise ChatError(f"{name}: image too large ({e})") from None
    except PermissionError:
        raise ChatError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ChatError(f"{name}: not an image file (PIL cannot identify it)") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:  # truncated or corrupt image data
        raise ChatError(f"{name}: unreadable image ({e})") from None


def _check_pixels(name: str, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise ChatError(f"{name}: image too large: {w} x {h} pixels, limit {MAX_IMAGE_PIXELS} pixels")


def _declared_size(path: Path) -> tuple[int, int] | None:
    """(W, H) from the header of an image that `Image.open` refused as a decompression bomb: the format
    plugins `Image.open` tries, without its size check (nothing is decoded)."""
    from PIL import Image

    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for factory, accept in list(Image.OPEN.values()):
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):
                continue
            fp.seek(0)
            try:
                return factory(fp, str(path)).size
            except Exception:  # noqa: BLE001  not this format: try the next, as Image.open does
                fp.seek(0)
    return None


def check_text(text: str, what: str = "message") -> str:
    """`text`, or ChatError saying why it cannot be sent to the model."""
    problem = text_problem(text)
    if problem:
        raise ChatError(f"the {what} is {problem}; nothing was sent")
    return text


def _parse_number(name: str, text: str, kind, lo=None, hi=None):
    try:
        value = kind(text.strip())
    except ValueError:
        raise ChatError(
            f"{name} needs a {'whole ' if kind is int else ''}number, got {text.strip()!r}"
        ) from None
    if math.isnan(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ChatError(f"{name} must be {bounds}, got {text.strip()}")
    return value


# ------------------------------------------------------------------------------------------ session


class ChatSession:
    """One conversation with a model: settings, history, attachments, the output folder."""

    def __init__(self, model, processor, *, out_dir, settings: Settings | None = None, model_name: str = ""):
        self.model, self.processor = model, processor
        self.out_dir = Path(out_dir)
        self.settings = settings or Settings()
        self.model_name = model_name
        self.reset()
        self.images: list[str] = []  # every image saved this session, in order (kept across /reset)
        self.turn = 0  # replies started so far; numbers the image files, so it is kept across /reset

    def reset(self):
        self.messages: list[dict] = []  # what the model reads (PIL images)
        self.transcript: list[dict] = []  # what /save writes (image paths)
        self.attachments: list[tuple] = []  # (PIL image, path) for the next user turn

    # ---- limits and settings

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def check_length(self, messages: list[dict]) -> int:
        """Token count of `messages` + the reply budget; ChatError naming the limit when it does not fit."""
        n = int(self.processor(messages, add_generation_prompt=True)["input_ids"].shape[1])
        budget = self.settings.max_new_tokens
        if n + budget > self.context_length:
            raise ChatError(
                f"prompt too long: the conversation is {n} tokens and {budget} are reserved for the reply, "
                f"but the model's context is {self.context_length} tokens (max_position_embeddings). "
                "Shorten the message or /reset the conversation."
            )
        return n

    def set(self, name: str, text: str) -> str:
        """Change one setting from user text (/steps, /cfg, /seed, /temperature); returns a confirmation."""
        s = self.settings
        if name == "steps":
            s.num_steps = _parse_number("/steps", text, int, 1, 64)
        elif name == "cfg":
            s.guidance = _parse_number("/cfg", text, float, 0.0, 100.0)
        elif name == "seed":
            s.seed = _parse_number("/seed", text, int, 0, 2**63 - 1)
        elif name == "temperature":
            s.temperature = _parse_number("/temperature", text, float, 0.0, 100.0)
        else:
            raise ChatError(f"unknown setting {name!r}")
        return self.describe_settings()

    def describe_settings(self) -> str:
        s = self.settings
        return (
            f"steps={s.num_steps} cfg={s.guidance:g} seed={s.seed} temperature={s.temperature:g} "
            f"max_new_tokens={s.max_new_tokens}"
        )

    def attach(self, path) -> str:
        image = load_image(path)
        resolved = str(Path(os.path.expanduser(str(path).strip().strip("'\""))).resolve())
        self.attachments.append((image, resolved))
        return resolved

    # ---- a reply

    def reply(self, text: str, *, force_image: bool = False) -> Iterator[Event]:
        """Send `text` (with the pending attachments); returns an iterator of the reply's Events.

        Input is checked here, before anything runs (ChatError). The turn is committed to the history
        when the reply ends, and also when it is interrupted (KeyboardInterrupt, or closing the
        iterator): the partial reply stays, with finish_reason "interrupted".
        """
        text = check_text(text.strip())
        if not text and not self.attachments:
            raise ChatError("empty message")
        user_parts = [{"type": "image", "image": im} for im, _ in self.attachments]
        user_record = [{"type": "image", "path": p} for _, p in self.attachments]
        if text:
            user_parts.append({"type": "text", "text": text})
            user_record.append({"type": "text", "text": text})
        messages = self.messages + [{"role": "user", "content": user_parts}]
        self.check_length(messages)  # raises before anything changes
        self.attachments = []
        self.turn += 1
        return self._run(messages, user_record, force_image)

    def _run(self, messages: list[dict], user_record: list[dict], force_image: bool) -> Iterator[Event]:
        from mmgen.generation import Finished, GeneratedImage, TextDelta, generate_interleaved

        s, turn, reply = self.settings, self.turn, _Turn()
        reason = "interrupted"
        try:
            parts = generate_interleaved(
                self.model, self.processor, messages,
                max_new_tokens=s.max_new_tokens, num_steps=s.num_steps, guidance=s.guidance,
                temperature=s.temperature, seed=s.seed, force_image=force_image,
            )  # fmt: skip
            for part in parts:
                if isinstance(part, TextDelta):
                    reply.add_text(part.text)
                    yield Event("text", part.text)
                elif isinstance(part, GeneratedImage):
                    path = self._save_image(
                        part.image, turn, sum(p["type"] == "image" for p in reply.record) + 1
                    )
                    reply.add_image(part.image, path)
                    yield Event("image", path)
                elif isinstance(part, Finished):
                    reason = part.reason
            yield Event("end", reason)
        finally:
            self.messages = messages + [{"role": "assistant", "content": reply.parts}]
            entry = {"role": "assistant", "content": reply.record, "finish_reason": reason}
            self.transcript += [{"role": "user", "content": user_record}, entry]

    def _save_image(self, image, turn: int, k: int) -> str:
        path = self.out_dir / f"turn{turn:03d}-image{k}.png"
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            image.save(path)
        except OSError as e:
            raise ChatError(f"cannot save the image {str(path)!r}: {e.strerror or e}") from None
        self.images.append(str(path))
        return str(path)

    def save(self, file) -> str:
        """Write the transcript as JSON; returns the path. ChatError if it cannot be written."""
        if not str(file).strip():
            raise ChatError("no file given (usage: /save FILE)")
        path = Path(os.path.expanduser(str(file).strip().strip("'\"")))
        data = {
            "model": self.model_name,
            "settings": asdict(self.settings),
            "out_dir": str(self.out_dir),
            "messages": self.transcript,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2) + "\n")
        except OSError as e:
            raise ChatError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
        return str(path)


# ------------------------------------------------------------------------------------------ terminal


def inline_image_protocol(env=None) -> str | None:
    """'kitty' or 'iterm2' when the terminal shows inline images (detected from the environment), else None."""
    env = os.environ if env is None else env
    if env.get("TERM") == "xterm-kitty" or env.get("KITTY_WINDOW_ID"):
        return "kitty"
    if env.get("TERM_PROGRAM") == "iTerm.app" or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm2"
    return None


def inline_image_sequence(path: str, protocol: str, cells: int = 16) -> str:
    """The escape sequence that draws the PNG at `path` inline, `cells` columns wide."""
    data = Path(path).read_bytes()
    b64 = base64.standard_b64encode(data).decode("ascii")
    if protocol == "iterm2":  # iTerm2 inline images protocol (OSC 1337 File=)
        return f"\x1b]1337;File=inline=1;size={len(data)};width={cells};preserveAspectRatio=1:{b64}\x07\n"
    if protocol == "kitty":  # kitty graphics protocol: PNG (f=100), transmit+display (a=T), 4096-byte chunks
        chunks = [b64[i : i + 4096] for i in range(0, len(b64), 4096)] or [""]
        out = []
        for i, chunk in enumerate(chunks):
            more = int(i < len(chunks) - 1)
            head = f"f=100,a=T,c={cells},m={more}" if i == 0 else f"m={more}"
            out.append(f"\x1b_G{head};{chunk}\x1b\\")
        return "".join(out) + "\n"
    raise ValueError(f"unknown inline image protocol {protocol!r}")


class Terminal:
    """The REPL: reads lines, runs commands, streams replies to `out`.

    MMGEN_CHAT_DELAY_S (seconds, default 0) pauses after each streamed piece: slow enough to watch a
    tiny model stream, and what the tests use to press Ctrl-C reliably in the middle of a reply.
    No single input ends the session: a `ChatError` is shown as `error: ...`, and so is any other
    exception (a bug; `debug` adds its traceback).
    """

    def __init__(self, session: ChatSession, *, out=None, inline: str | None = None, debug: bool = False):
        self.session, self.out, self.inline, self.debug = session, out or sys.stdout, inline, debug
        self.delay = float(os.environ.get("MMGEN_CHAT_DELAY_S", "0") or 0)
        self._midline = False  # text was written since the last newline

    def say(self, text: str = "", end: str = "\n"):
        if self._midline and end == "\n":  # status lines start on a line of their own
            text = "\n" + text
        self.out.write(text + end)
        self.out.flush()
        self._midline = end != "\n" and bool(text + end)

    def stream(self, text: str, *, force_image: bool = False) -> None:
        """Run one reply, printing text as it comes and each image's path; Ctrl-C stops only this reply."""
        events = self.session.reply(text, force_image=force_image)
        self.say("mmgen> ", end="")
        try:
            for ev in events:
                if ev.kind == "text":
                    self.say(ev.value, end="")
                elif ev.kind == "image":
                    self.say(f"[image saved: {ev.value}]")
                    if self.inline:
                        self.say(inline_image_sequence(ev.value, self.inline), end="")
                        self._midline = False
                elif ev.value == "length":
                    self.say(f"[reply cut at max_new_tokens={self.session.settings.max_new_tokens}]")
                if self.delay:
                    time.sleep(self.delay)
            if self._midline:
                self.say("", end="\n")
                self._midline = False
        except KeyboardInterrupt:
            events.close()
            self.say("[interrupted: reply stopped; the session goes on]")

    def handle(self, line: str) -> bool:
        """One input line; returns False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.stream(line)
            return True
        command, _, arg = line.partition(" ")
        command = command.lower()
        s = self.session
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            self.say(HELP)
        elif command == "/image":
            self.say(f"attached {s.attach(arg)} (to your next message)")
        elif command == "/draw":
            self.stream(arg, force_image=True)
        elif command in ("/steps", "/cfg", "/seed", "/temperature"):
            if not arg.strip():
                raise ChatError(f"usage: {command} VALUE (now: {s.describe_settings()})")
            self.say(s.set(command[1:], arg))
        elif command == "/settings":
            self.say(s.describe_settings())
        elif command == "/save":
            self.say(f"transcript saved: {s.save(arg)}")
        elif command == "/reset":
            s.reset()
            self.say("conversation reset")
        else:
            self.say(f"unknown command {command!r}; type /help for the list")
        return True

    def run(self, read=input) -> None:
        # Ctrl-C must raise KeyboardInterrupt here even when this process inherited SIGINT as ignored
        # (e.g. started in the background by a non-interactive shell): it stops a reply, not the session.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.say("mmgen chat. Type /help for commands, /quit to leave.")
        while True:
            try:
                line = read("you> ")
            except EOFError:
                self.say()
                break
            except KeyboardInterrupt:
                self.say("\n(Ctrl-C: type /quit or press Ctrl-D to leave)")
                continue
            except UnicodeDecodeError as e:  # a stream that does not escape undecodable bytes
                self.say(f"error: the line is not valid UTF-8 text ({e.reason}); nothing was sent")
                continue
            try:
                if not self.handle(line):
                    break
            except ChatError as e:
                self.say(f"error: {e}")
            except KeyboardInterrupt:  # Ctrl-C during a command (a reply handles its own)
                self.say("[interrupted; the session goes on]")
            except Exception as e:  # noqa: BLE001  a bug must not end the conversation either
                if self.debug:
                    import traceback

                    traceback.print_exc()
                self.say(f"error: unexpected {type(e).__name__}: {e} (the session goes on)")
        self.say("bye")


# ------------------------------------------------------------------------------------------ CLI


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


def load_model(name: str, device: str | None = None):
    """AutoModel + AutoProcessor from a directory or Hub id (after `import mmgen` registers them)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    import mmgen  # noqa: F401  registers the Auto classes

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(name).to(device).eval()
    processor = AutoProcessor.from_pretrained(name)
    return model, processor


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
    session = ChatSession.__new__(ChatSession)  # reuse the validation of the /commands
    session.settings = s
    for name, value in (("steps", args.steps), ("cfg", args.cfg), ("seed", args.seed),
                        ("temperature", args.temperature)):  # fmt: skip
        try:
            session.set(name, str(value))
        except ChatError as e:
            raise ChatError(f"--{str(e).removeprefix('/')}") from None  # "/steps must be ..." -> "--steps ..."
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


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device!r}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")


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
    _check_device(args.device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars in the chat
    try:
        model, processor = load_model(name, args.device)
    except Exception as e:  # any loading failure is reported, not a traceback
        if args.debug:
            raise
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UsageError(f"cannot load the model from {name!r}: {reason}") from None
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
