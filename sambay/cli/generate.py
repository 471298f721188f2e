"""`sambay generate` (one prompt, streamed) and `sambay chat` (an interactive conversation).

    sambay generate "Write a haiku about CPUs." --chat --max-new-tokens 64
    sambay chat --model path/to/Phi-4-mini-flash-reasoning --system "Be brief."

Both load a model folder (or a Hugging Face repo, or a preset with --random-weights) and its
tokenizer, print the text as it is generated, and take the same sampling flags. Sampling flags
left out fall back to the checkpoint's generation_config.json (Phi-4-mini-flash: temperature 0.6,
top_p 0.95), else greedy decoding.
"""

from __future__ import annotations

import argparse
import sys

from sambay.errors import SambayError
from sambay.runtime.engine import Engine
from sambay.runtime.load import load_for_inference
from sambay.runtime.sampling import SamplingParams, generation_defaults
from sambay.serve.reasoning import CONTENT, REASONING, ReasoningParser, opens_thinking

DEFAULT_MAX_NEW_TOKENS = 256


def add_generate(gen: argparse.ArgumentParser) -> None:
    gen.description = ("Generate a continuation of PROMPT (or, with --chat, a chat reply to it), streamed "
                       "to stdout; stats go to stderr.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the model's chat template")
    model_flags(gen)
    _sampling_flags(gen)
    _reasoning_flags(gen)
    gen.set_defaults(func=run_generate)


def add_chat(chat: argparse.ArgumentParser) -> None:
    chat.description = ("Interactive chat: type a message, get a streamed reply. /reset clears the history, "
                        "/exit or Ctrl-D quits, Ctrl-C stops the current reply. Each reply is followed by "
                        "its stats on stderr.")
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message to start with")
    model_flags(chat)
    _sampling_flags(chat)
    _reasoning_flags(chat)
    chat.set_defaults(func=run_chat)


def model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --quantize, --random-weights: what load_model_flags reads."""
    p.add_argument("--model", default=None, metavar="PATH|REPO|PRESET",
                   help="model folder, Hugging Face repo id or preset (default: the embedded model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight dtype (default: the checkpoint's)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="quantize the weights after loading")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of the model's shape (needed for a preset)")


def _reasoning_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hide-reasoning", action="store_true",
                   help="leave a reasoning model's thinking (<think> ... </think>) out of the reply "
                        "(shown dimmed on a terminal otherwise; with generate, only with --chat)")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"most tokens to generate per reply (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 = greedy (default: the checkpoint's generation_config, else 0)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling, in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely ids")
    p.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="drop ids less likely than P times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="Hugging Face repetition penalty (1 = off; default: the checkpoint's "
                        "generation_config, else 1)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="X", help="OpenAI presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                   help="OpenAI frequency penalty")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop before this string (repeatable)")


def sampling_params(args: argparse.Namespace, generation_config: dict | None) -> SamplingParams:
    """The flags, with what they leave out taken from generation_config.json (generation_defaults).
    Asking for a sampling filter (top-p, top-k, min-p) without any temperature means temperature 1."""
    gen = generation_defaults(generation_config)
    temperature = args.temperature if args.temperature is not None else gen.get("temperature")
    if temperature is None:
        asked = args.top_p is not None or args.top_k is not None or args.min_p is not None
        temperature = 1.0 if asked else 0.0

    def pick(name: str, default: float) -> float:
        value = getattr(args, name)
        return value if value is not None else gen.get(name, default)

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=float(temperature), top_p=float(pick("top_p", 1.0)),
        top_k=int(pick("top_k", 0) or 0), min_p=float(pick("min_p", 0.0) or 0.0),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=list(args.stop),
    ).validate()


def load_model_flags(args: argparse.Namespace, with_tokenizer: bool = True):
    """(model, tokenizer) as the model flags ask, through the one loader (sambay.runtime.load)."""
    return load_for_inference(args.model, dtype=args.dtype, quantize=args.quantize,
                              random_weights=args.random_weights, with_tokenizer=with_tokenizer)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


DIM, RESET = "\033[2m", "\033[0m"


class ReplyPrinter:
    """Writes a chat reply as it streams. A reasoning model's thinking (<think> ... </think>, see
    sambay.serve.reasoning) is shown dimmed on a terminal and left out with --hide-reasoning; into a
    pipe the reply goes as the model wrote it, tags included. `answer` is the reply without its
    thinking, which is what the chat history keeps."""

    def __init__(self, hide: bool, tty: bool, open_at_start: bool = False):
        self.parser = ReasoningParser(open_at_start)
        self.hide, self.tty, self.dim = hide, tty, False
        self.answer: list[str] = []

    def push(self, piece: str) -> None:
        parts = self.parser.push(piece)
        if not self.hide and not self.tty:
            _write(piece)
            self.answer += [text for field, text in parts if field == CONTENT]
            return
        self._show(parts)

    def close(self) -> None:
        parts = self.parser.flush()
        if not self.hide and not self.tty:
            self.answer += [text for field, text in parts if field == CONTENT]
        else:
            self._show(parts)
        if self.dim:
            _write(RESET)
            self.dim = False

    def _show(self, parts: list[tuple[str, str]]) -> None:
        for field, text in parts:
            if field == REASONING:
                if self.hide:
                    continue
                if not self.dim:
                    _write(DIM)
                    self.dim = True
            else:
                self.answer.append(text)
                if self.dim:
                    _write(RESET)
                    self.dim = False
            _write(text)


def _safe_stdout() -> None:
    # A reply can hold any character; a pipe with a narrow locale must not crash the command.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")


def run_generate(args: argparse.Namespace) -> int:
    sampling_params(args, None)  # bad flags fail before a slow load
    model, tokenizer = load_model_flags(args)
    params = sampling_params(args, model.generation_config)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True)
    _safe_stdout()
    stream = Engine(model, tokenizer).stream_text(prompt, params)
    printer = ReplyPrinter(args.hide_reasoning, sys.stdout.isatty(), opens_thinking(prompt)) if args.chat else None
    try:
        for piece in stream:
            printer.push(piece) if printer else _write(piece)
    finally:
        stream.close()
        if printer:
            printer.close()
        _write("\n")
    print(stream.stats.summary(), file=sys.stderr, flush=True)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    sampling_params(args, None)  # bad flags fail before a slow load
    model, tokenizer = load_model_flags(args)
    params = sampling_params(args, model.generation_config)
    engine = Engine(model, tokenizer)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    _safe_stdout()
    if interactive:
        print("type a message; /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply",
              file=sys.stderr, flush=True)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)", file=sys.stderr, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        stream = None
        printer = ReplyPrinter(args.hide_reasoning, sys.stdout.isatty(), opens_thinking(prompt))
        try:
            stream = engine.stream_text(prompt, params)  # prefills the whole conversation
            for piece in stream:
                printer.push(piece)
        except SambayError as e:  # e.g. the conversation outgrew the context: keep the program alive
            history.pop()
            print(f"sambay: error: {e}; /reset starts a new conversation", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # stops this reply only
            if stream is None:  # still reading the prompt: forget the turn
                print("\n(reply stopped)", file=sys.stderr, flush=True)
                engine.reset()
                history.pop()
                continue
            stream.close()
            printer.close()
            _write("\n")
            print("(reply stopped)", file=sys.stderr, flush=True)
        else:
            printer.close()
            _write("\n")
        print(stream.stats.summary(), file=sys.stderr, flush=True)  # as generate's last line, per reply
        history.append({"role": "assistant", "content": "".join(printer.answer)})  # the thinking is not kept
