"""The README's picture of the chat page: a real conversation with a checkpoint, caught mid-answer.

    python -m bench.screenshot                          # the release model -> docs/chat_page.png
    python -m bench.screenshot --ckpt runs/default --out /tmp/page.png

Starts serve.py, drives Debian's Chromium with Playwright (pip install -r tests/requirements.txt;
apt-get install chromium), sends the turns below one after another, and takes the picture while the last
answer is still streaming.
"""

import argparse
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from bench.serve_load import start_server

REPO = Path(__file__).resolve().parent.parent

TURNS = ["Hi! I want to start baking bread at home. Where should I begin?", "What kind of flour should I buy?"]
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--ckpt", default="", help="checkpoint (default: serve.py's, the release model if untrained)")
    parser.add_argument("--out", default=str(REPO / "docs" / "chat_page.png"), help="where to write the PNG")
    parser.add_argument("--width", type=int, default=760, help="window width in pixels")
    args = parser.parse_args()
    process, url, _ = start_server(args.ckpt)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": 720})
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("step")
            for turn, text in enumerate(TURNS, start=1):
                page.fill("#prompt", text)
                page.keyboard.press("Enter")
                if turn < len(TURNS):
                    expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=120_000)
            page.fill("#prompt", "How long does the dough need to rise?")  # typed, not sent: the next turn
            # mid-answer once 60 characters are in, or the whole answer if it is shorter
            page.wait_for_function(f"""() => {{
                const answers = document.querySelectorAll('.msg.assistant'), last = answers[answers.length - 1];
                return answers.length === {len(TURNS)} &&
                       (last.textContent.length > 60 || !last.classList.contains('streaming'));
            }}""", timeout=120_000)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
