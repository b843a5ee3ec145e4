"""The terminal front-end of the chat: a REPL with /commands that streams replies (`mmgen-chat`)."""

from __future__ import annotations

import base64
import os
import signal
import sys
import threading
import time
from pathlib import Path

from mmgen.chat_session import ChatError, ChatSession

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
