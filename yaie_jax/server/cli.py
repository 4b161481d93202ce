"""The `yaie` command.

    yaie serve [MODEL] [flags]      the OpenAI-compatible server (same flags as `python -m yaie_jax.serve`)
    yaie chat [MODEL] [flags]       an interactive terminal chat that streams tokens
                                    - in-process (loads the engine; engine flags as for serve), or
                                    - against a running server with --url http://host:8000/v1 [--api-key KEY]

In the chat, `/reset` clears the conversation, `/exit` (or Ctrl-D) quits, Ctrl-C stops the current answer.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional, Sequence

from ..sampling_params import SamplingParams


def _chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yaie chat", description="Interactive chat (streams tokens).",
                                add_help=True)
    p.add_argument("--url", help="chat with a running server (OpenAI base URL, e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", dest="chat_api_key", default=None, help="API key for --url (or YAIE_API_KEY)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", dest="chat_max_tokens", type=int, default=256)
    p.add_argument("--seed", dest="chat_seed", type=int, default=None)
    return p


class _Interrupted(Exception):
    pass


def chat_loop(respond: Callable[[List[dict], Callable[[str], None]], str], *, read_line: Callable[[str], str],
              write: Callable[[str], None], system: Optional[str] = None) -> int:
    """The REPL, independent of where answers come from.

    `respond(messages, emit)` streams the assistant's answer through `emit(delta)` and returns the whole text
    (raising KeyboardInterrupt stops that answer, keeping what was said). Returns the number of turns.
    """
    history: List[dict] = [{"role": "system", "content": system}] if system else []
    turns = 0
    while True:
        try:
            line = read_line(">>> ")
        except EOFError:
            write("\n")
            return turns
        except KeyboardInterrupt:
            write("\n")
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return turns
        if cmd == "/reset":
            history = history[:1] if system else []
            write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = respond(history, write)
        except KeyboardInterrupt as e:
            answer = getattr(e, "partial", "")
            write(" [stopped]")
        write("\n")
        history.append({"role": "assistant", "content": answer})
        turns += 1


def local_responder(engine, params: SamplingParams):
    """`respond` for chat_loop that drives an `LLMEngine` (or anything with its interface) in this thread."""
    from ..tokenizer import apply_chat_template
    counter = [0]

    def respond(messages: List[dict], emit: Callable[[str], None]) -> str:
        prompt = apply_chat_template(engine.tokenizer, messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        counter[0] += 1
        rid = f"chat-{counter[0]}"
        engine.add_request(rid, ids, params)
        text = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    new = out.outputs[0].text
                    if new.startswith(text) and len(new) > len(text):
                        emit(new[len(text):])
                    text = new
                    if out.finished:
                        return text
        except KeyboardInterrupt as e:
            engine.abort_request(rid)
            e.partial = text
            raise
        return text

    return respond


def remote_responder(url: str, api_key: Optional[str], model: Optional[str], params: SamplingParams):
    """`respond` for chat_loop that streams from a running OpenAI-compatible server."""
    import openai
    client = openai.OpenAI(base_url=url, api_key=api_key or "none")
    model_id = model or client.models.list().data[0].id

    def respond(messages: List[dict], emit: Callable[[str], None]) -> str:
        text = ""
        stream = client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                                temperature=params.temperature, top_p=params.top_p,
                                                max_tokens=params.max_tokens, seed=params.seed)
        try:
            for chunk in stream:
                for ch in chunk.choices:
                    if ch.delta and ch.delta.content:
                        emit(ch.delta.content)
                        text += ch.delta.content
        except KeyboardInterrupt as e:
            stream.close()
            e.partial = text
            raise
        return text

    return respond


def chat_main(argv: Sequence[str]) -> int:
    import os

    from .settings import ConfigError, build_parser, parse_args
    chat_args, rest = _chat_parser().parse_known_args(list(argv))
    params = SamplingParams(temperature=chat_args.temperature, top_p=chat_args.top_p,
                            max_tokens=chat_args.chat_max_tokens, seed=chat_args.chat_seed)

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    if chat_args.url:
        model = rest[0] if rest and not rest[0].startswith("-") else None
        respond = remote_responder(chat_args.url, chat_args.chat_api_key or os.environ.get("YAIE_API_KEY"), model,
                                   params)
    else:
        try:
            settings, ns = parse_args(rest, parser=build_parser("yaie chat"))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from .serve import build_engine
        engine = build_engine(settings, getattr(ns, "engine_factory", None))
        respond = local_responder(engine, params)
    write("yaie chat: /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer.\n")
    chat_loop(respond, read_line=input, write=write, system=chat_args.system)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: yaie {serve,chat} [MODEL] [flags]\n"
             "  yaie serve [MODEL] [flags]   OpenAI-compatible server (yaie serve --help)\n"
             "  yaie chat [MODEL] [flags]    interactive chat, in-process or --url of a server (yaie chat --help)\n")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from .serve import main as serve_main
        return serve_main(rest, prog="yaie serve")
    if cmd == "chat":
        if any(a in ("-h", "--help") for a in rest):
            _chat_parser().print_help()
            print("\nIn-process chat also takes the engine flags of `yaie serve` (e.g. --dtype, --max-model-len).")
            return 0
        return chat_main(rest)
    print(f"yaie: unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
