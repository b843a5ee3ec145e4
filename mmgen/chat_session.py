"""A conversation with an mmgen model, shared by the terminal and the browser chat.

`ChatSession` keeps the conversation (messages with PIL images for the model, a JSON transcript
with image paths for people), checks inputs, runs `mmgen.generation.generate_interleaved` and saves
every generated image under the output folder as `turnNNN-imageK.png` (turn number, image number
within the reply), so names are deterministic. Bad input (missing, unreadable, non-image or too
large files, text that is not valid UTF-8, over-long prompts, bad values) raises `ChatError` with a
message for the user and never ends the session.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmgen.cli import UsageError, text_problem

# The most pixels an attached image may have: any camera's photo fits; a decompression bomb (a few KB
# of PNG that decode to gigabytes) does not. The model sees images at its own small resolution anyway.
MAX_IMAGE_PIXELS = 8192 * 8192
class ChatError(UsageError):
    """A problem with the user's input: shown to the user, the session goes on."""


# The settings a user changes by name (/steps 8, --steps 8, the web sliders): field, type, lowest, highest
SETTINGS = {
    "steps": ("num_steps", int, 1, 64),  # image refinement steps (flow-map jumps)
    "cfg": ("guidance", float, 0.0, 100.0),  # classifier-free guidance scale (1 = off)
    "seed": ("seed", int, 0, 2**63 - 1),
    "temperature": ("temperature", float, 0.0, 100.0),  # text sampling (0 = greedy)
}


@dataclass
class Settings:
    num_steps: int = 4
    guidance: float = 1.0
    seed: int = 0
    temperature: float = 0.0
    max_new_tokens: int = 256

    def change(self, name: str, value, prefix: str = "/") -> None:
        """Set the setting `name` of SETTINGS to `value` (a number); ChatError naming `prefix + name`
        when it is not a number of the setting's type in its range. Whole floats (web sliders) pass as ints."""
        if name not in SETTINGS:
            raise ChatError(f"unknown setting {name!r}")
        field_name, kind, lo, hi = SETTINGS[name]
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise ChatError(f"{prefix}{name} needs a {'whole ' if kind is int else ''}number, got {value!r}")
        if math.isnan(value) or not lo <= value <= hi:
            raise ChatError(f"{prefix}{name} must be between {lo} and {hi}, got {value}")
        setattr(self, field_name, kind(value))


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


def parse_setting(name: str, text: str, prefix: str = "/"):
    """The value of setting `name` from what the user typed after /NAME; ChatError when it is not a number."""
    kind = SETTINGS[name][1]
    try:
        value = kind(text.strip())
    except ValueError:
        raise ChatError(f"{prefix}{name} needs a {'whole ' if kind is int else ''}number, got {text.strip()!r}") from None
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
        if name not in SETTINGS:
            raise ChatError(f"unknown setting {name!r}")
        self.settings.change(name, parse_setting(name, text))
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
