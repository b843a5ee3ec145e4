"""The chat front-ends: the terminal REPL end to end in a real pseudo-terminal, the non-interactive mode,
the session logic, and the Gradio app in a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from PIL import Image

from mmgen.chat_session import MAX_IMAGE_PIXELS, ChatError, ChatSession, Settings, load_image
from mmgen.chat_terminal import Terminal, inline_image_protocol, inline_image_sequence
from mmgen.configuration_mmgen import TINY_LLAMA_KWARGS, MMGenConfig
from mmgen.generation import TextDelta, generate_interleaved
from mmgen.modeling_mmgen import MMGenForConditionalGeneration
from mmgen.processing_mmgen import MMGenProcessor
from mmgen.tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256  # the tiny model's max_position_embeddings: an over-long prompt fits on one terminal line
MAX_NEW = 16


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TERM="dumb", PYTHONUNBUFFERED="1")
    env.pop("TERM_PROGRAM", None)
    env.pop("KITTY_WINDOW_ID", None)
    return {**env, **extra}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model + processor, saved with save_pretrained like a training export."""
    torch.manual_seed(0)
    text_config = {**TINY_LLAMA_KWARGS, "model_type": "llama", "max_position_embeddings": CONTEXT}
    model = MMGenForConditionalGeneration(MMGenConfig(text_config=text_config)).eval()
    processor = MMGenProcessor.from_config(model.config, load_tokenizer(str(ROOT / "tokenizers" / "shapes")))
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    good = d / "red square.png"
    im = Image.new("RGB", (40, 40), (255, 255, 255))
    im.paste((220, 20, 20), (8, 8, 30, 30))
    im.save(good)
    (d / "notes.txt").write_text("not an image\n")
    (d / "broken.png").write_bytes(good.read_bytes()[:60])  # a PNG header, then nothing
    _bomb_png(d / "bomb.png", 20000)
    return {"good": good, "text": d / "notes.txt", "broken": d / "broken.png", "dir": d, "bomb": d / "bomb.png"}


def _bomb_png(path: Path, side: int) -> None:
    """A valid 1-bit PNG of side x side black pixels: ~60 KB on disk, 1.2 GB decoded as RGB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, z = b"\0" * (1 + (side + 7) // 8), zlib.compressobj(9)  # filter byte + packed bits
    pixels = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _expected_reply(model, processor, prompt: str) -> str:
    """What the engine itself answers to a first turn with the CLI's settings (greedy, seed 0)."""
    parts = generate_interleaved(
        model, processor, [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        max_new_tokens=MAX_NEW, num_steps=4, seed=0,
    )  # fmt: skip
    return "".join(p.text for p in parts if isinstance(p, TextDelta))


# ------------------------------------------------------------------------------------------ the REPL


def _command(child, line: str, expect: str | list) -> str:
    child.sendline(line)
    child.expect(expect)
    out = child.before + (child.after if isinstance(child.after, str) else "")
    child.expect_exact("you> ")
    return out


def test_repl_end_to_end_in_a_pseudo_terminal(tiny, files, tmp_path):
    path, model, processor = tiny
    out = tmp_path / "images"
    child = pexpect.spawn(
        sys.executable, ["-m", "mmgen.chat", "--model", str(path), "--out", str(out), "--max-new-tokens",
                         str(MAX_NEW)],
        cwd=tmp_path, env=_env(MMGEN_CHAT_DELAY_S="0.25"), encoding="utf-8", codec_errors="replace", timeout=60,
        dimensions=(50, 4000),
    )  # fmt: skip
    try:
        child.expect_exact("you> ")

        # A prompt streams its reply: the first piece shows while the rest is still being generated.
        expected = _expected_reply(model, processor, "Draw a red circle.")
        assert expected.strip(), "the tiny model should say something in its first turn"
        child.sendline("Draw a red circle.")
        child.expect_exact("mmgen> ")
        child.expect(r"\S")
        first = child.after
        assert "you> " not in child.buffer  # the rest of the reply is still being generated
        child.expect_exact("you> ")
        shown = (first + child.before).replace("\r\n", "\n")
        assert expected.strip() in shown  # the engine's own reply text, streamed to the terminal

        # A forced image is saved under --out with a deterministic name, and its path is printed.
        text = _command(child, "/draw Draw a blue square.", r"\[image saved: (\S+)\]")
        saved = Path(re.search(r"\[image saved: (\S+)\]", text).group(1))
        assert saved == out / "turn002-image1.png"
        with Image.open(saved) as im:
            assert im.size == (32, 32) and im.mode == "RGB"

        # Each bad input gives a clear message, and the session goes on.
        bad = {
            f"/image {files['dir'] / 'missing.png'}": "no such file",
            f"/image {files['text']}": "not an image file",
            f"/image {files['broken']}": "unreadable image",
            f"/image {files['dir']}": "is a directory",
            f"/image {files['bomb']}": f"bomb.png': image too large: 20000 x 20000 pixels, limit {MAX_IMAGE_PIXELS}",
            "/image": "no image path given",
            "/steps many": "/steps needs a whole number, got 'many'",
            "/steps 0": "/steps must be between 1 and 64, got 0",
            "/cfg -1": "/cfg must be between 0.0 and 100.0",
            "/temperature hot": "/temperature needs a number",
            "/seed": "usage: /seed VALUE",
            "/frobnicate": "unknown command '/frobnicate'; type /help",
            "/save /proc/forbidden/t.json": "cannot write",
            " ".join(
                ["circle"] * 400
            ): r"prompt too long: the conversation is \d+ tokens and 16 are reserved "
            r"for the reply, but the model's context is 256 tokens \(max_position_embeddings\)",
        }
        for line, message in bad.items():
            _command(child, line, message)
        os.write(child.child_fd, b"Draw a \xff\xfe circle.\n")  # bytes that are not UTF-8, as a terminal sends them
        child.expect_exact("error: the message is not valid UTF-8 text (byte 0xff at character 7")
        child.expect_exact("you> ")

        # Settings and help.
        assert "steps=2" in _command(child, "/steps 2", "steps=2 cfg=1 seed=0")
        assert "/image PATH" in _command(child, "/help", r"/quit.*leave")

        # An attached image goes with the next user turn (path with a space, quoted).
        _command(child, f'/image "{files["good"]}"', "attached .*red square.png")
        _command(child, "What is in the picture?", "mmgen> ")

        # Ctrl-C during a reply stops that reply and keeps the session.
        child.sendline("Tell me more.")
        child.expect_exact("mmgen> ")
        child.expect(r"\S")
        child.sendintr()
        child.expect_exact("[interrupted: reply stopped; the session goes on]")
        child.expect_exact("you> ")
        child.sendintr()  # Ctrl-C at the prompt does not end the session either
        child.expect_exact("(Ctrl-C: type /quit or press Ctrl-D to leave)")

        # /save writes a JSON transcript with the image paths.
        transcript = tmp_path / "chat.json"
        _command(child, f"/save {transcript}", "transcript saved: ")
        data = json.loads(transcript.read_text())
        roles = [m["role"] for m in data["messages"]]
        assert roles == ["user", "assistant"] * 4
        assert data["settings"]["num_steps"] == 2 and data["model"] == str(path)
        user_images = [p["path"] for p in data["messages"][4]["content"] if p["type"] == "image"]
        assert user_images == [str(files["good"].resolve())]
        drawn = [p["path"] for p in data["messages"][3]["content"] if p["type"] == "image"]
        assert drawn == [str(saved)]
        assert data["messages"][1]["content"][0]["text"] == expected
        assert data["messages"][-1]["finish_reason"] == "interrupted"

        _command(child, "/reset", "conversation reset")
        child.sendline("/quit")
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# ------------------------------------------------------------------------------------------ scripts


def _run(args, cwd, **env):
    return subprocess.run(
        [sys.executable, "-m", "mmgen.chat", *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def test_non_interactive_prompt_saves_the_image_and_a_transcript(tiny, files, tmp_path):
    path = tiny[0]
    out = tmp_path / "out"
    run = _run(["--model", str(path), "--prompt", "Draw a red circle.", "--image", str(files["good"]),
                "--force-image", "--out", str(out), "--max-new-tokens", "4", "--steps", "1"], tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"[image saved: {out / 'turn001-image1.png'}]" in run.stdout
    assert (out / "turn001-image1.png").is_file()
    data = json.loads((out / "transcript.json").read_text())
    assert data["messages"][0]["content"][0] == {"type": "image", "path": str(files["good"].resolve())}
    assert data["messages"][1]["content"][0]["type"] == "image"


def test_non_interactive_bad_image_is_a_clear_error_before_loading(tmp_path, files):
    run = _run(
        ["--model", str(tmp_path / "nowhere"), "--prompt", "hi", "--image", str(files["text"])], tmp_path
    )
    assert run.returncode == 2
    assert "error: cannot attach" in run.stderr and "not an image file" in run.stderr
    assert "Traceback" not in run.stderr


def test_without_a_model_it_says_how_to_make_one(tmp_path):
    run = _run([], tmp_path)
    assert run.returncode == 2
    assert "no export of the default run at runs/default/final" in run.stderr
    assert "accelerate launch training/train.py" in run.stderr


def test_without_a_model_it_uses_the_default_export_and_says_so(tiny, tmp_path):
    final = tmp_path / "runs" / "default" / "final"
    final.parent.mkdir(parents=True)
    final.symlink_to(tiny[0])
    run = _run(["--prompt", "hi", "--max-new-tokens", "2", "--out", "o"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "using the default run's export runs/default/final/" in run.stderr


def test_unloadable_model_is_reported_without_a_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    run = _run(["--model", str(tmp_path / "empty"), "--prompt", "hi"], tmp_path)
    assert run.returncode == 2
    assert "error: --model " in run.stderr and "cannot load the model from it" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("model, offline", [("nope/dir", "1"), ("nope/dir/x", "0"), ("./nope", "0")])
def test_a_missing_model_directory_is_named_not_taken_for_a_hub_id(tmp_path, model, offline):
    """A path that cannot be a Hub id (or any path while the Hub is offline) is a missing directory."""
    run = _run(["--model", model, "--prompt", "hi"], tmp_path, HF_HUB_OFFLINE=offline, TRANSFORMERS_OFFLINE=offline)
    assert run.returncode == 2 and run.stderr == f"error: no such model directory: {model}\n"


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "error: --steps must be between 1 and 64, got 0"),
    (["--prompt", "Draw a \udcff circle."], "error: the --prompt is not valid UTF-8 text (byte 0xff at character 7"),
    (["--prompt", "hi", "--image", "BOMB"], "image too large: 20000 x 20000 pixels"),
    (["--prompt", "hi", "--out", "NOTES"], "is not a directory"),
    (["--device", "toaster"], "error: --device 'toaster'"),
    (["--stepz", "2"], "error: unrecognized arguments: --stepz 2 (see mmgen-chat --help)"),
])  # fmt: skip
def test_bad_arguments_are_one_line_errors_with_status_2(tiny, files, tmp_path, args, message):
    """Each is refused before the model loads (the non-UTF-8 prompt arrives as surrogate-escaped bytes)."""
    args = [{"BOMB": str(files["bomb"]), "NOTES": str(files["text"])}.get(a, a) for a in args]
    run = _run(["--model", str(tiny[0]), *args], tmp_path)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_a_decompression_bomb_is_refused_from_its_header(files):
    with pytest.raises(ChatError) as err:
        load_image(files["bomb"])
    assert str(err.value) == (f"cannot attach {str(files['bomb'])!r}: image too large: 20000 x 20000 pixels, "
                              f"limit {MAX_IMAGE_PIXELS} pixels")  # fmt: skip


def test_a_session_survives_undecodable_text_and_unexpected_errors(tiny, tmp_path):
    session = ChatSession(tiny[1], tiny[2], out_dir=tmp_path)
    with pytest.raises(ChatError, match=r"not valid UTF-8 text \(byte 0xff at character 3"):
        session.reply("hi \udcff")
    assert session.transcript == [] and session.turn == 0

    def boom(arg):
        raise TypeError("a bug")

    session.attach = boom
    lines = iter(["hi \udcff", "/image x.png", "/settings"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    out = io.StringIO()
    Terminal(session, out=out).run(read=read)
    shown = out.getvalue().splitlines()
    assert "error: the message is not valid UTF-8 text (byte 0xff at character 3" in shown[1]
    assert shown[2] == "error: unexpected TypeError: a bug (the session goes on)"
    assert shown[3].startswith("steps=4") and shown[-1] == "bye"


# ------------------------------------------------------------------------------------------ the session


def test_an_interrupted_reply_is_kept_and_image_names_are_deterministic(tiny, tmp_path):
    _, model, processor = tiny
    session = ChatSession(model, processor, out_dir=tmp_path, settings=Settings(max_new_tokens=6))
    events = session.reply("Draw a red circle.", force_image=True)
    first = next(events)
    assert first.kind == "image" and first.value == str(tmp_path / "turn001-image1.png")
    events.close()  # what a Ctrl-C does
    assert session.transcript[-1]["finish_reason"] == "interrupted"
    assert session.messages[-1]["content"][0]["type"] == "image"
    session.reset()
    events = list(session.reply("Again.", force_image=True))
    assert events[0].value == str(tmp_path / "turn002-image1.png")  # numbering survives /reset
    assert events[-1].kind == "end" and session.images == [first.value, events[0].value]


def test_settings_reject_bad_values_with_the_allowed_range(tiny, tmp_path):
    session = ChatSession(tiny[1], tiny[2], out_dir=tmp_path)
    with pytest.raises(ChatError, match="between 1 and 64"):
        session.set("steps", "100")
    with pytest.raises(ChatError, match="needs a number"):
        session.set("cfg", "nan?")
    assert "cfg=3" in session.set("cfg", "3")
    with pytest.raises(ChatError, match="empty message"):
        session.reply("   ")


def test_inline_images_only_for_terminals_that_support_them(files):
    assert inline_image_protocol({"TERM": "xterm-kitty"}) == "kitty"
    assert inline_image_protocol({"TERM_PROGRAM": "iTerm.app"}) == "iterm2"
    assert inline_image_protocol({"TERM": "xterm-256color"}) is None
    data = files["good"].read_bytes()
    iterm = inline_image_sequence(str(files["good"]), "iterm2")
    assert iterm.startswith("\x1b]1337;File=inline=1;") and f"size={len(data)}" in iterm
    kitty = inline_image_sequence(str(files["good"]), "kitty")
    assert kitty.startswith("\x1b_Gf=100,a=T") and kitty.rstrip().endswith("\x1b\\")


# ------------------------------------------------------------------------------------------ the web UI


def test_web_respond_streams_text_and_images_into_history_and_gallery(tiny, files, tmp_path):
    from mmgen.chat_web import respond, session_factory

    _, model, processor = tiny
    template = ChatSession(model, processor, out_dir=tmp_path, settings=Settings(max_new_tokens=6))
    new_session = session_factory(template)
    message = {"text": "Draw a red circle.", "files": [str(files["good"])]}
    steps = list(respond(message, [], 2.0, 1.0, 3.0, 0.0, True, None, new_session=new_session))
    box, history, gallery, session = steps[-1]
    assert box == {"text": "", "files": []} and len(steps) >= 3  # the reply arrives in several updates
    assert history[0] == {"role": "user", "content": {"path": str(files["good"])}}
    assert history[1] == {"role": "user", "content": "Draw a red circle."}
    image = str(tmp_path / "session-001" / "turn001-image1.png")
    assert history[2] == {"role": "assistant", "content": {"path": image}}
    assert gallery == [(image, "turn001-image1.png")]
    assert session.settings.num_steps == 2 and session.settings.seed == 3
    text = "".join(m["content"] for m in history[3:] if isinstance(m["content"], str))
    assert text and text == "".join(
        p["text"] for p in session.transcript[1]["content"] if p["type"] == "text"
    ) + "(reply cut at max_new_tokens=6)" * (session.transcript[1]["finish_reason"] == "length")

    # Bad input: an error message in the chat, the session goes on with its history.
    *_, (_, history2, _, same) = respond({"text": "hi", "files": [str(files["text"])]}, history, 2, 1, 3, 0,
                                         False, session, new_session=new_session)  # fmt: skip
    assert same is session and history2[-1]["content"].startswith("Error: cannot attach")
    assert session.attachments == [] and len(session.transcript) == 2
    *_, (_, bombed, _, _) = respond({"text": "hi", "files": [str(files["bomb"])]}, history2, 2, 1, 3, 0, False,
                                    session, new_session=new_session)  # fmt: skip
    with pytest.raises(ChatError) as terminal_message:
        load_image(files["bomb"])
    assert bombed[-1]["content"] == f"Error: {terminal_message.value}"  # the terminal's message, word for word
    assert "image too large: 20000 x 20000 pixels" in bombed[-1]["content"] and len(session.transcript) == 2
    *_, (_, history3, _, _) = respond({"text": "x " * 300, "files": []}, history2, 2, 1, 3, 0, False, session,
                                      new_session=new_session)  # fmt: skip
    assert "the model's context is 256 tokens (max_position_embeddings)" in history3[-1]["content"]


def _browser():
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "no headless browser installed: apt-get install chromium chromium-driver (CI installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_web_app_in_headless_chromium(tiny, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    path, model, processor = tiny
    reference = ChatSession(
        model, processor, out_dir=tmp_path / "ref", settings=Settings(max_new_tokens=MAX_NEW)
    )
    expected = "".join(
        e.value for e in reference.reply("Draw a red circle.", force_image=True) if e.kind == "text"
    )
    browser = _browser()
    port, out = _free_port(), tmp_path / "web"
    server = subprocess.Popen(
        [sys.executable, "-m", "mmgen.chat", "--web", "--model", str(path), "--out", str(out), "--host",
         "127.0.0.1", "--port", str(port), "--max-new-tokens", str(MAX_NEW)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for line in server.stdout:
            if f"http://127.0.0.1:{port}" in line:
                break
        else:
            pytest.fail("the web server exited before serving")
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        browser.find_element(By.CSS_SELECTOR, "#force-image input[type=checkbox]").click()
        box.send_keys("Draw a red circle.")
        box.send_keys(Keys.ENTER)
        image = out / "session-001" / "turn001-image1.png"
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#chat img") and image.is_file())
        wait.until(lambda b: expected.strip()[:8] in b.find_element(By.CSS_SELECTOR, "#chat").text)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img"))
        chat_text = browser.find_element(By.CSS_SELECTOR, "#chat").text
        assert "Draw a red circle." in chat_text
        src = browser.find_element(By.CSS_SELECTOR, "#chat img").get_attribute("src")
        assert "turn001-image1" in src
        shot = tmp_path / "web_chat.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 1000
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)
