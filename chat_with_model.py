"""
Chat with a TinyGPT checkpoint in the terminal: the answer streams token by token, and the model sees the
whole conversation (rendered with the same function that rendered its training data).

    python chat_with_model.py                          # newest checkpoint in ckpt/, else the release model
    python chat_with_model.py --ckpt ckpt/gpt_step2000.pt --temperature 0.7 --top_p 0.9
    python chat_with_model.py --prompt "What is a llama?"
    python chat_with_model.py --knowledge ../shared/data/knowledge   # look things up before each answer
    printf 'Hi!\\nTell me more.\\n' | python chat_with_model.py    # one user turn per line, a transcript out

With --knowledge, each user turn is first looked up in a full-text index (retrieval.py); the best passages
enter the prompt as a context turn after it, a line names their sources, and /sources shows them. Sampling,
generation and the answer to one turn are engine.py's; the model and checkpoint loading, newgpt.py's. This
file is the conversation's state and the REPL.
"""

import argparse
import dataclasses
import os
import sys
import time

from engine import add_model_arguments, apply_settings, load_engine
from retrieval import format_passages
from runtime import UserError

# -----------------------------------------------------------------------------
# The conversation


class Chat:
    """The terminal's conversation: its history, system prompt and settings, answered by the engine."""

    def __init__(self, engine, sampling, system=""):
        self.engine, self.sampling, self.system = engine, sampling, system
        self.retrieval = engine.index is not None  # /retrieval on|off
        self.generator = engine.generator(sampling.seed)
        self.history = []  # (role, content) pairs, oldest first
        self.turn, self.last_reply = None, None

    @property
    def passages(self):
        """What was looked up for the newest user turn."""
        return self.turn.passages if self.turn else []

    def reset(self):
        self.history = []

    def add_user_turn(self, user_text):
        """Append a user turn (dropping the oldest that no longer fit) and return it prepared (a Turn)."""
        self.turn = self.engine.prepare(self.system, self.history, user_text, self.sampling.max_new_tokens,
                                        self.retrieval)
        self.history = list(self.turn.history)
        return self.turn

    def stream_reply(self, turn):
        """Yield the answer's text in pieces; the answer joins the history, also when the caller stops early
        (Ctrl-C)."""
        self.last_reply = self.engine.reply(turn, self.sampling, self.generator)
        try:
            yield from self.last_reply
        finally:
            self.history.append(("assistant", self.last_reply.text))


# -----------------------------------------------------------------------------
# The REPL

HELP = """commands:
  /help                 this help
  /reset                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt (empty TEXT clears it) and reset
  /set NAME=VALUE ...   change sampling, e.g. /set temperature=0.7 top_p=0.9
  /settings             show the sampling settings
  /sources              show the passages looked up for the last answer (--knowledge)
  /retrieval on|off     look things up before answering, or not (--knowledge)
  /quit, exit, Ctrl-D   leave; Ctrl-C stops an answer, and at an empty prompt leaves"""


def sources_line(passages):
    """One short line naming where the passages came from: their titles (or first words)."""
    names = [p.title or " ".join(p.text.split()[:6]) + " ..." for p in passages]
    return "sources: " + "; ".join(f"[{i}] {name}" for i, name in enumerate(names, start=1))


def stream_answer(chat, user_text, out, show_speed, notes=None):
    """Stream one answer to out; the sources line goes to notes (by default stderr: with --prompt, stdout
    holds the answer alone)."""
    started = time.time()
    turn = chat.add_user_turn(user_text)
    if turn.notice:
        print(turn.notice, file=sys.stderr)
    try:
        for piece in chat.stream_reply(turn):
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    if chat.passages:
        out.flush()
        (notes or sys.stderr).write(sources_line(chat.passages) + "\n")
    if show_speed:
        seconds, tokens = time.time() - started, chat.last_reply.tokens
        out.write(f"[{tokens} tokens in {seconds:.2f}s, {tokens / max(seconds, 1e-9):.1f} tok/s]\n")
    out.flush()


def handle_command(chat, line, out):
    """Run a /command; returns False when the user wants to leave."""
    command, _, rest = line.partition(" ")
    if command in ("/quit", "/exit", "exit", "quit"):
        return False
    if command == "/help":
        out.write(HELP + "\n")
    elif command == "/reset":
        chat.reset()
        out.write("(conversation cleared)\n")
    elif command == "/system":
        chat.system = rest.strip()
        chat.reset()
        out.write(f"(system prompt {'set' if chat.system else 'cleared'}; conversation cleared)\n")
    elif command == "/sources":
        out.write((format_passages(chat.passages) if chat.passages else "(no passages for the last answer)") + "\n")
    elif command == "/retrieval":
        if chat.engine.index is None or rest.strip() not in ("on", "off"):
            out.write("usage: /retrieval on|off (needs --knowledge PATH)\n")
        else:
            chat.retrieval = rest.strip() == "on"
            out.write(f"(retrieval {rest.strip()})\n")
    elif command == "/settings":
        out.write(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(chat.sampling).items()) + "\n")
    elif command == "/set":
        try:
            chat.sampling = apply_settings(chat.sampling, rest.split())
            out.write(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(chat.sampling).items()) + "\n")
        except UserError as e:
            out.write(f"error: {e}\n")
    else:
        out.write(f"unknown command {command}; /help lists them\n")
    return True


def enable_line_editing():
    """Arrow keys, history and Ctrl-R at the prompt: importing readline is enough for input() to use it."""
    try:
        import readline  # noqa: F401
    except ImportError:  # Windows has no readline
        pass


def repl(chat, interactive, show_speed):
    """Read user turns until EOF or /quit. Piped input gets a transcript: each line echoed after "you> "
    and each answer after "bot> ", with a blank line between exchanges, so multi-line answers stay apart."""
    out = sys.stdout
    while True:
        try:
            line = input("\nyou> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            out.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if not interactive:
            out.write(f"you> {line}\n")
        if line.startswith("/") or line in ("exit", "quit"):
            if not handle_command(chat, line, out):
                break
            continue
        out.write("bot> ")
        try:
            stream_answer(chat, line, out, show_speed, notes=out)
        except UserError as e:
            out.write(f"error: {e}\n")
        if not interactive:
            out.write("\n")


def load_chat(args):
    """(Chat, checkpoint path, checkpoint dict) for the parsed flags, or a UserError naming what is wrong."""
    engine, sampling, path, ckpt = load_engine(args)
    return Chat(engine, sampling, args.system), path, ckpt


def build_parser():
    parser = argparse.ArgumentParser(description="Chat with a TinyGPT checkpoint in the terminal (the web page "
                                                 "and the API: serve.py).")
    add_model_arguments(parser)
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--show_speed", action="store_true", help="print tokens per second after each answer")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.prompt is not None and not args.prompt.strip():
            raise UserError("--prompt is empty: give the message to answer")
        chat, path, ckpt = load_chat(args)
        if args.prompt is not None:
            stream_answer(chat, args.prompt, sys.stdout, args.show_speed)
            return 0
        interactive = sys.stdin.isatty()
        if interactive:
            enable_line_editing()
            val = ckpt.get("val_loss")
            model = chat.engine.model
            print(f"TinyGPT {model.num_params() / 1e6:.1f}M params, step {ckpt['step']}"
                  f"{f', val loss {val:.3f}' if val is not None else ''}, on {model.lm_head.weight.device}. "
                  f"/help for commands.")
        repl(chat, interactive, args.show_speed)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, without Python's own message at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
