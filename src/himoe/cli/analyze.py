"""`himoe analyze`: where the tokens of each domain go, per layer, group and expert.

Prints a table per layer, writes analysis.json and one PNG heatmap per layer into --out
(default MODEL_DIR/analysis; these files are not part of the checkpoint's manifest).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from himoe.checkpoint import safe_path
from himoe.cli.options import add_device, add_model_dir
from himoe.errors import UserError


def parse_domains(items: list[str]) -> list[tuple[str, Path]]:
    domains, seen = [], set()
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UserError(f"--domain {item!r} is not NAME=FILE; write e.g. --domain "
                            "poetry=poems.txt")
        if name in seen:
            raise UserError(f"--domain {name!r} is given twice; give each domain one name")
        seen.add(name)
        domains.append((name, Path(path)))
    return domains


def read_domain(name: str, path: Path) -> str:
    if not path.is_file():
        raise UserError(f"--domain {name}={path}: the file does not exist or is not a file; "
                        "pass a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--domain {name}={path} is not valid UTF-8 (byte {e.start}); convert "
                        "it to UTF-8") from None


def domain_texts(args, cfg) -> list[tuple[str, str, str]]:
    """[(name, source, text)]: the --domain files, or the model's corpus split by speaker."""
    from himoe.analysis.domains import play_domains
    from himoe.data.corpora import open_corpus

    if args.domain:
        return [(name, str(path), read_domain(name, path))
                for name, path in parse_domains(args.domain)]
    corpus = open_corpus(cfg.data_file)
    text = "".join(corpus.texts) if hasattr(corpus, "texts") else corpus.text()
    path = corpus.source
    parts = play_domains(text)
    if len(parts) < 2:
        raise UserError(f"the corpus {path} has no speeches in the play layout (a paragraph "
                        "whose first line is a speaker label such as 'Ham.') to split by; pass "
                        "at least two --domain NAME=FILE")
    return [(name, f"{path}: {name if name == 'stage directions' else name + '.'}", part)
            for name, part in parts.items()]


def build_report(model, cfg, texts, tok, max_tokens: int) -> dict:
    import torch

    from himoe.analysis.balance import load_figures
    from himoe.analysis.domains import NMI_DEFINITION, nmi, route_counts, top_tokens, windows

    N, M = cfg.num_moes, cfg.num_experts
    domains, counts, tokens = [], [], 0
    for name, source, text in texts:
        kept, _ = tok.drop_unknown(text)
        skipped = len(text) - len(kept)
        if not kept:
            raise UserError(f"domain {name} ({source}) has no characters the model knows; "
                            "pass a text in the model's alphabet")
        windows_WS = windows(tok.encode(kept), cfg.block_size, max_tokens)
        counts_LE, tokens_LEV = route_counts(model, windows_WS)
        counts.append(counts_LE)
        tokens = tokens + tokens_LEV
        domains.append({"name": name, "source": source, "tokens": windows_WS.numel(),
                        "text_chars": len(text), "skipped_chars": skipped})
    counts_DLE = torch.stack(counts)
    layers = []
    for i in range(counts_DLE.shape[1]):
        c_DE = counts_DLE[:, i]
        c_DG = c_DE.view(len(domains), N, M).sum(-1)
        share = lambda c: (c.double() / c.sum(-1, keepdim=True).clamp_min(1)).tolist()
        names = [d["name"] for d in domains]
        layers.append({
            "layer": i + 1, "nmi_expert": nmi(c_DE), "nmi_group": nmi(c_DG),
            "group_share": dict(zip(names, share(c_DG))),
            "expert_share": dict(zip(names, share(c_DE))),
            "assignments": dict(zip(names, c_DE.sum(-1).tolist())),
            "balance": load_figures(c_DE.sum(0), N, cfg.group_sizes(i)),
            "expert_top_tokens": top_tokens(tokens[i], tok.decode)})
    return {"nmi_definition": NMI_DEFINITION, "max_tokens_per_domain": max_tokens,
            "domains": domains, "layers": layers}


def _nmi_text(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: dict, num_experts: int) -> str:
    from himoe.cli.table import format_table

    names = [d["name"] for d in report["domains"]]
    lines = ["domains: " + "; ".join(
        f"{d['name']} ({d['tokens']:,} tokens"
        + (f", {d['skipped_chars']:,} characters outside the vocabulary skipped"
           if d["skipped_chars"] else "") + ")" for d in report["domains"])]
    for fig in report["layers"]:
        bal = fig["balance"]
        lines.append("")
        lines.append(f"layer {fig['layer']}: NMI(domain; expert) {_nmi_text(fig['nmi_expert'])}"
                     f", NMI(domain; group) {_nmi_text(fig['nmi_group'])}; all domains: "
                     f"expert-load CV {bal['expert_cv']:.2f}, MaxVio {bal['expert_maxvio']:.2f}"
                     f", dead experts {bal['dead_experts']}")
        rows = []
        for g, all_share in enumerate(bal["group_share"]):
            rows.append([f"group {g + 1}"] + [f"{fig['group_share'][n][g]:.1%}" for n in names]
                        + [f"{all_share:.1%}", ""])
            for j in range(bal["group_sizes"][g]):
                e = g * num_experts + j
                rows.append([f"  expert {g + 1}.{j + 1}"]
                            + [f"{fig['expert_share'][n][e]:.1%}" for n in names]
                            + [f"{bal['expert_share'][e]:.1%}",
                               ", ".join(f"{text!r} {share:.0%}"
                                         for text, share in fig["expert_top_tokens"][e])])
        headers = ["share of tokens"] + names + ["all", "reads most"]
        lines.append(format_table(headers, rows, right=set(range(1, len(headers) - 1))))
    return "\n".join(lines)


def cmd_analyze(args) -> int:
    import torch

    from himoe.analysis.heatmaps import domain_expert_heatmaps
    from himoe.checkpoint.card import atomic_write_text, load_model
    from himoe.data.tokenizers import tokenizer_for

    if args.max_tokens < 1:
        raise UserError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if args.domain:
        parse_domains(args.domain)  # refuse a malformed flag before loading the model
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device "
                        "cpu or auto")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    model_dir = Path(args.model_dir)
    model, cfg, vocab, step = load_model(model_dir, device)
    if not model.moe_layers:
        raise UserError(f"{model_dir} is a dense model: it has no routing to analyse")
    report = build_report(model, cfg, domain_texts(args, cfg), tokenizer_for(cfg, vocab, model_dir),
                          args.max_tokens)
    report = {"model_dir": str(model_dir), "step": step} | report
    for d in report["domains"]:
        if d["skipped_chars"]:
            print(f"himoe: note: domain {d['name']}: skipped {d['skipped_chars']} characters "
                  "outside the model's vocabulary", file=sys.stderr)
    print(format_report(report, cfg.num_experts))
    # Inside the model directory, never through a link planted there.
    out = Path(args.out) if args.out else safe_path.inside(model_dir, "analysis", "dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(report, indent=1), out / "analysis.json")
    written = [out / "analysis.json"]
    if not args.no_plots:
        written += domain_expert_heatmaps(report["layers"], cfg.num_experts, out)
    print(f"\nNMI = {report['nmi_definition']}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="where the tokens of each domain go: shares per group "
                                       "and expert, specialisation (NMI), heatmaps")
    add_model_dir(p)
    p.add_argument("--domain", action="append", default=[], metavar="NAME=FILE",
                   help="a domain and its text file (repeat); default: the model's corpus "
                        "split into the speeches of its main characters and the stage "
                        "directions")
    p.add_argument("--out", default=None, help="output directory (default: MODEL_DIR/analysis)")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=5000,
                   help="tokens read per domain, in windows spread over the whole text")
    p.add_argument("--no_plots", "--no-plots", action="store_true",
                   help="skip the PNG heatmaps")
    add_device(p)
    p.set_defaults(func=cmd_analyze)
