"""`himoe chat`: an interactive prompt over a saved model, with streamed output.

Each input line (plus its newline) is appended to the conversation, the model continues it
for --max_new_tokens tokens, printed one by one as they are sampled, and the reply joins the
conversation. The conversation is kept to the model's window (block_size tokens). /reset
clears it, /quit, end of input (Ctrl-D) or Ctrl-C exit with code 0, empty lines are ignored.

--show_routing prints after each token its (group.expert) in every layer, 1-based like the
checkpoint files: `e[3.5|1.2]` went to expert 5 of group 3 in layer 1 and expert 2 of group
1 in layer 2 (choices of a top-k router are joined with '+'). A token is routed when the
model reads it, at the next step, so with --show_routing each token is printed one step
later, together with its routing; a newline token shows as ⏎. Colours (one per group) are
used only when stdout is a terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path

from himoe.cli.options import add_device, add_model_dir, seed_flag
from himoe.errors import UserError

COMMANDS = "/reset clears the conversation, /quit (or Ctrl-D) exits"
COLOURS = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96]  # ANSI foreground, one per group


class ChatSession:
    def __init__(self, model, tokenizer, args, out=None, err=None, colour: bool | None = None):
        import torch

        self.model, self.tok, self.args = model, tokenizer, args
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.colour = self.out.isatty() if colour is None else colour
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed)
        self.window = model.cfg.block_size
        self.context: list[int] = []

    # --- output ---
    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _note(self, text: str) -> None:
        print(f"himoe: {text}", file=self.err, flush=True)

    def _paint(self, text: str, group: int) -> str:
        if not self.colour:
            return text
        return f"\x1b[{COLOURS[(group - 1) % len(COLOURS)]}m{text}\x1b[0m"

    def _current_routing(self) -> list[list[tuple[int, int]]]:
        """The (group, expert) choices, 1-based, of the last position the model read, per
        layer."""
        M = self.model.cfg.num_experts
        return [[(e // M + 1, e % M + 1) for e in moe.last_ids_TK[-1].tolist()]
                for moe in self.model.moe_layers.values()]

    def _show(self, token: int, routing) -> str:
        text = self.tok.decode([token])
        shown = "⏎" if text == "\n" else text
        tag = "|".join("+".join(self._paint(f"{g}.{j}", g) for g, j in layer)
                       for layer in routing)
        first_group = routing[0][0][0] if routing else 1
        return self._paint(shown, first_group) + f"[{tag}]" + ("\n" if text == "\n" else "")

    # --- one turn ---
    def reply(self, line: str) -> list[int]:
        """Append `line` and a newline to the conversation, stream the continuation, and add
        it to the conversation; returns the new tokens."""
        import torch

        text, missing = self.tok.drop_unknown(line + "\n")
        if missing:
            from himoe.data.tokenizers import show_chars
            self._note(f"dropped characters outside the vocabulary: {show_chars(missing)}")
        if not text.strip():
            return []
        self.context = (self.context + self.tok.encode(text))[-self.window:]
        routing = self.args.show_routing and bool(self.model.moe_layers)
        new: list[int] = []

        def on_token(next_B1):
            token = int(next_B1[0, 0])
            if routing:
                if new:  # the step that sampled `token` has just read the previous one
                    self._write(self._show(new[-1], self._current_routing()))
            else:
                self._write(self.tok.decode([token]))
            new.append(token)

        a = self.args
        self.model.generate(torch.tensor([self.context], device=self.device),
                            a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, generator=self.generator, on_token=on_token)
        if routing and new:  # the last token is read once more, in its window, for its routing
            ids = (self.context + new)[-self.window:]
            with torch.no_grad():
                self.model(torch.tensor([ids], device=self.device))
            self._write(self._show(new[-1], self._current_routing()))
        if not new or self.tok.decode(new[-1:]) != "\n":
            self._write("\n")
        self.context = (self.context + new)[-self.window:]
        return new

    # --- the loop ---
    def read_line(self, stdin) -> str | None:
        """The next input line without its newline; None at end of input. A terminal gets a
        prompt (and line editing from input()); piped input is read as it comes."""
        if stdin.isatty():
            try:
                return input("> ")
            except EOFError:
                return None
        line = stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    def run(self, stdin) -> int:
        self._note(f"chat with {self.args.model_dir}: {COMMANDS}")
        try:
            while True:
                line = self.read_line(stdin)
                if line is None:
                    if stdin.isatty():
                        self._write("\n")
                    return 0
                command = line.strip()
                if not command:
                    continue
                if command == "/quit":
                    return 0
                if command == "/reset":
                    self.context = []
                    self._note("conversation cleared")
                    continue
                if command in ("/help", "/?"):
                    self._note(COMMANDS)
                    continue
                if command.startswith("/") and " " not in command:
                    self._note(f"unknown command {command}; {COMMANDS}")
                    continue
                self.reply(line)
        except KeyboardInterrupt:  # Ctrl-C ends the chat, not with a traceback
            self._write("\n")
            return 0


def cmd_chat(args) -> int:
    import torch

    from himoe.checkpoint.card import load_model
    from himoe.cli.generate import check_generate_args
    from himoe.data.tokenizers import tokenizer_for

    args.num_samples = 1
    check_generate_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device "
                        "cpu or auto")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    model, cfg, vocab, _ = load_model(Path(args.model_dir), device)
    model.eval()
    tokenizer = tokenizer_for(cfg, vocab, Path(args.model_dir))
    return ChatSession(model, tokenizer, args).run(sys.stdin)


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive prompt with streamed output (/reset, /quit)")
    add_model_dir(p)
    p.add_argument("--show_routing", "--show-routing", action="store_true",
                   help="print each token's group.expert per layer after it")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200,
                   help="tokens generated per reply")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top_k", "--top-k", type=int, default=None)
    p.add_argument("--top_p", "--top-p", type=float, default=None)
    p.add_argument("--seed", type=seed_flag, default=1337)
    add_device(p)
    p.set_defaults(func=cmd_chat)
