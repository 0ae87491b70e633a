"""Where tokens go, by domain: routing counts per domain, shares, and how specialised the
experts are (normalised mutual information between domain and chosen expert).

A domain is a text. Without user texts, the model's own corpus is split into the speeches of
its main characters plus the stage directions: in the shipped Hamlet (and any play in the
same layout) a speech is a paragraph whose first line is the speaker's label, e.g. "Ham.".
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from himoe.model import HiMoEModel

# A speaker label: "Ham.", "King.", "I Play.", "Both." -- one or two capitalised words.
SPEAKER = re.compile(r"[A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*)?\.")
INLINE_DIRECTION = re.compile(r"\[[^\]]*\]\s*")  # "[Aside.] " inside a speech
STAGE = "stage directions"
NMI_DEFINITION = "I(D;E) / sqrt(H(D) * H(E)), over routed assignments; 0 = no relation, 1 = " \
    "the expert determines the domain and vice versa"


def play_domains(text: str, speakers: int = 5) -> dict[str, str]:
    """{name: text}: the speeches of the `speakers` characters who speak the most (by
    characters), named by their label without the dot, and the stage directions. Speeches
    exclude the label line and inline directions such as "[Aside.]"."""
    speeches: dict[str, list[str]] = {}
    directions = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = para.strip("\n").split("\n")
        if para.lstrip().startswith("["):
            directions.append(para.strip())
        elif len(lines) >= 2 and SPEAKER.fullmatch(lines[0].strip()):
            body = INLINE_DIRECTION.sub("", "\n".join(lines[1:])).strip()
            if body:
                speeches.setdefault(lines[0].strip().rstrip("."), []).append(body)
    volume = Counter({name: sum(map(len, parts)) for name, parts in speeches.items()})
    domains = {name: "\n\n".join(speeches[name]) + "\n" for name, _ in
               volume.most_common(speakers)}
    if directions:
        domains[STAGE] = "\n".join(directions) + "\n"
    return domains


def windows(ids: list[int], size: int, max_tokens: int) -> torch.Tensor:
    """[W, size] windows of ids, evenly spread over the whole text and at most max_tokens
    tokens in all, so that a capped domain is still sampled from beginning to end. A text
    shorter than one window is one shorter window."""
    n = len(ids) // size
    if n == 0:
        return torch.tensor([ids])
    keep = max(1, min(n, max_tokens // size))
    picks = torch.linspace(0, n - 1, keep).round().long().unique().tolist()
    return torch.tensor([ids[i * size:(i + 1) * size] for i in picks])


@torch.no_grad()
def route_counts(model: HiMoEModel, windows_WS: torch.Tensor,
                 batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """([layers, E] assignments per expert, [layers, E, V] the same by the token id read)
    when the model reads the windows (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    layers = model.moe_layers
    E, V = model.cfg.total_experts, model.cfg.vocab_size
    tokens_LEV = torch.zeros(len(layers), E * V, dtype=torch.long)
    for start in range(0, len(windows_WS), batch):
        ids_BS = windows_WS[start:start + batch]
        model(ids_BS.to(device))
        ids_T = ids_BS.reshape(-1)
        for i, moe in enumerate(layers.values()):
            experts_TK = moe.last_ids_TK.cpu()
            pairs = experts_TK * V + ids_T[:, None]  # each assignment as (expert, token)
            tokens_LEV[i] += torch.bincount(pairs.reshape(-1), minlength=E * V)
    model.train(was_training)
    tokens_LEV = tokens_LEV.view(len(layers), E, V)
    return tokens_LEV.sum(-1), tokens_LEV


def top_tokens(tokens_EV: torch.Tensor, decode, k: int = 3) -> list[list[tuple[str, float]]]:
    """For each expert, the k tokens it reads most, as (text, share of its assignments)."""
    total_E = tokens_EV.sum(-1).clamp_min(1)
    counts_EK, ids_EK = tokens_EV.topk(min(k, tokens_EV.shape[1]), dim=-1)
    return [[(decode([t]), c / total) for t, c in zip(ids, counts) if c > 0]
            for ids, counts, total in zip(ids_EK.tolist(), counts_EK.tolist(), total_E.tolist())]


def nmi(counts_DE: torch.Tensor) -> float | None:
    """Normalised mutual information between the row variable (domain) and the column
    variable (expert or group) of a count table: I / sqrt(H(D) H(E)). None when either
    variable is constant (one domain, or one expert takes everything): it is undefined."""
    p_DE = counts_DE.double() / counts_DE.sum().clamp_min(1)
    p_D, p_E = p_DE.sum(1), p_DE.sum(0)

    def h(p):
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    h_d, h_e = h(p_D), h(p_E)
    if h_d <= 0 or h_e <= 0:
        return None
    nz = p_DE > 0
    mi = float((p_DE[nz] * (p_DE[nz] / (p_D[:, None] * p_E[None, :])[nz]).log()).sum())
    return max(0.0, mi) / math.sqrt(h_d * h_e)
