"""`himoe merge`: one hierarchical model from models trained apart (Branch-Train-MiX with a
two-level router: level 1 picks the branch, level 2 an expert inside it).

The sources share a backbone shape and tokenizer: branches of one seed, each trained on its
own corpus with `himoe train --init_from SEED`. In the merged model:
- embeddings, attention and LayerNorms are the sources' mean (the branches start from the
  same weights, so their parameters still correspond);
- the shared expert is the sources' mean too: a dense source's is the first shared_hidden
  units of its FFN (and its output bias), as `himoe upcycle` splits it;
- a dense source becomes one level-1 group whose experts are copies of the rest of its FFN
  (upcycle's split; the output layer times M / k, so that uniform level-2 weights add up to
  the branch's FFN), with optional --noise; a hierarchical source brings its groups whole
  (experts, group routers, their level-1 rows and selection biases);
- the level-1 rows of the dense sources' groups are fitted so that level 1 sends each
  branch's domain to its group: per layer (in order, through the merged model itself, so
  each router sees what it will route), a softmax regression without bias (the router has
  none) of the group on that layer's router input over each branch's own corpus, each
  group's tokens weighing the same, with a small L2 penalty that keeps the rows finite
  where domains separate. On the merge study's three domains it routes held-out tokens to
  their own groups with NMI 0.68 / 0.71 at step 0 (seed 1337), where each row along the
  branch's mean hidden state gave 0.55 / 0.53. `merge` prints how many of each branch's
  own tokens this sends to its group;
- when every group is a dense branch, level-1 balancing (the Switch term and the selection
  bias) aims each group at its branch's share of the corpora's tokens (config.json's
  group_shares), not at equal shares: the fine-tuning mix is their union, and domains of
  unequal size would otherwise be pushed off their own groups. `--into` keeps the old
  groups' ratio and gives the new one its corpus's share.
The result is an ordinary model directory at step 0 (train_state.pt a new run's), so
`himoe train --model_dir M --resume --data_file MIX --max_iters K` fine-tunes it on the mix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import card_layout, safe_path
from himoe.config import HiMoEConfig, ModelConfig
from himoe.data.batches import get_batch
from himoe.data.corpora import open_corpus, token_splits, unknown_chars
from himoe.edit.upcycle import BACKBONE, dense_parts, expert_copies, fresh_train_state
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.model.routers.registry import router_spec

SHAPE = ("n_embd", "n_layer", "n_head", "block_size", "ffn_mult", "vocab_size", "tokenizer")
FIT_BATCHES = 8  # batches of each source's corpus the level-1 rows are fitted on
FIT_L2 = 1e-3  # the fit's penalty on the squared rows (per token's mean cross-entropy)
FIT_ITERS = 100  # L-BFGS iterations per layer


@dataclass
class Source:
    path: Path
    cfg: HiMoEConfig
    vocab: list[str]
    step: int

    @property
    def dense(self) -> bool:
        return router_spec(self.cfg.router).dense

    @property
    def groups(self) -> int:
        return 1 if self.dense else self.cfg.num_moes


def read_sources(paths: list[Path]) -> list[Source]:
    """The sources' configs, refused with one line each where they cannot be merged."""
    if len(paths) < 2:
        raise UserError(f"himoe merge needs two or more --from models, got {len(paths)}; "
                        "name each branch with its own --from")
    seen: dict[Path, Path] = {}
    sources = []
    for path in paths:
        if path.resolve() in seen:
            raise UserError(f"--from {path} is named twice (as {seen[path.resolve()]} too); "
                            "name each branch once")
        seen[path.resolve()] = path
        cfg, vocab, step = checkpoint.read_config(path)
        sources.append(Source(path, cfg, vocab, step))
    first = sources[0]
    for s in sources[1:]:
        for name in SHAPE:
            if getattr(s.cfg, name) != getattr(first.cfg, name):
                raise UserError(f"--from {s.path} has {name} {getattr(s.cfg, name)} but "
                                f"{first.path} has {getattr(first.cfg, name)}; merge branches "
                                "of one seed model (himoe train --init_from SEED)")
        if s.vocab != first.vocab or tokenizer_bytes(s) != tokenizer_bytes(first):
            raise UserError(f"--from {s.path} has another tokenizer than {first.path}; merge "
                            "branches of one seed model, which share its tokenizer")
    for s in sources:
        if not s.dense and (not router_spec(s.cfg.router).group_routers or s.cfg.group_experts):
            raise UserError(f"--from {s.path} is a {s.cfg.router} model"
                            f"{' with groups of different sizes' if s.cfg.group_experts else ''};"
                            " merge dense models or hierarchical ones with equal groups")
    return sources


def tokenizer_bytes(source: Source) -> bytes:
    path = source.path / "tokenizer.json"
    return path.read_bytes() if source.cfg.tokenizer == "bpe" and path.is_file() else b""


def merged_config(sources: list[Source], given: dict) -> HiMoEConfig:
    """The merged model's settings: the sources' backbone and training settings, himoe's
    default routing (a hierarchical source's own group shape), one group per dense source
    and every group of a hierarchical one; then the flags given."""
    first = sources[0].cfg
    defaults = HiMoEConfig()
    routing = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(ModelConfig)
               if f.name not in BACKBONE}
    moe = next((s.cfg for s in sources if not s.dense), None)
    if moe is not None:  # its groups come whole, so their shape rules
        routing |= {k: getattr(moe, k) for k in ("num_experts", "top_k_experts",
                                                 "shared_fraction", "expert_hidden")}
    routing["num_moes"] = sum(s.groups for s in sources)
    cfg = dataclasses.replace(first, **routing | given | {"router": "hierarchical"}).validate()
    if cfg.top_k_groups != 1:
        raise UserError(f"--top_k_groups {cfg.top_k_groups}: a merged model sends each token "
                        "to one branch; drop the flag")
    dense = next((s.cfg for s in sources if s.dense), None)
    if dense is not None:
        routed = dense.ffn_hidden - cfg.shared_hidden
        if routed <= 0:
            raise UserError(f"the dense FFN has {dense.ffn_hidden} hidden units and the shared "
                            f"expert would take {cfg.shared_hidden}; lower --shared_fraction")
        if moe is not None and moe.ffn_hidden != routed:
            raise UserError(f"a dense source's FFN leaves experts {routed} wide but the "
                            f"hierarchical source's are {moe.ffn_hidden}; merge sources of "
                            "one kind, or upcycle the dense one with matching widths first")
        cfg = dataclasses.replace(cfg, expert_hidden=0 if routed == cfg.ffn_hidden
                                  else routed).validate()
    for s in sources:
        if not s.dense and (s.cfg.shared_hidden, s.cfg.ffn_hidden) != (cfg.shared_hidden,
                                                                         cfg.ffn_hidden):
            raise UserError(f"--from {s.path}'s experts and shared expert do not have the "
                            "merged model's widths; drop the width flags")
    return dataclasses.replace(cfg, data_file=None)


def mean_state(states: list[dict], keys: list[str]) -> dict:
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
            for k in keys}


def place_groups(state: dict, cfg: HiMoEConfig, source: Source, sd: dict, g0: int,
                 noise: float, gen: torch.Generator) -> list[dict]:
    """Write `source`'s groups into the merged state from group g0 on (the module
    docstring's rules); returns its shared expert per layer. A dense source's level-1 row
    is left for fit_level1_rows."""
    S, M = cfg.shared_hidden, cfg.num_experts
    c = M / cfg.top_k_experts  # uniform level-2 weights sum to k / M within the group
    shared_parts = []
    for layer in range(cfg.n_layer):
        r = card_layout.moe_key(layer, "router.")
        if source.dense:
            shared, routed = dense_parts(sd, layer, S)
            for name, block in expert_copies(routed, c, M, noise, gen).items():
                key = card_layout.moe_key(layer, f"experts.{name}")
                state[key].view(cfg.num_moes, M, *block.shape[1:])[g0] = block
            state[r + "group_weight_NMD"][g0] = 0.0  # uniform within the branch's group
        else:
            shared = {k.split(".shared_ffn.", 1)[1]: v for k, v in sd.items()
                      if k.startswith(f"blocks.{layer}.shared_ffn.")}
            n = source.groups
            for _, name in card_layout.EXPERT_ENTRIES:
                key = card_layout.moe_key(layer, f"experts.{name}")
                view = state[key].view(cfg.num_moes, M, *sd[key].shape[1:])
                view[g0:g0 + n] = sd[key].view(n, M, *sd[key].shape[1:])
            spec = router_spec(cfg.router)
            for _, name in spec.main_entries:  # [N, ...]: one row per group
                state[r + name][g0:g0 + n] = sd[r + name]
            for _, name in spec.group_entries:  # stacked over the groups' expert slots
                slots = card_layout.slots_NM(state[r + name], name, cfg)
                slots[g0:g0 + n] = card_layout.slots_NM(sd[r + name], name, source.cfg)
        shared_parts.append(shared)
    return shared_parts


def merged_model(sources: list[Source], models: list[HiMoEModel], cfg: HiMoEConfig,
                 noise: float, seed: int) -> HiMoEModel:
    """The merged weights, with the dense groups' level-1 rows still zero (fit_level1_rows)."""
    model = HiMoEModel(cfg)
    state = model.state_dict()
    states = [m.state_dict() for m in models]
    backbone = [k for k in states[0] if ".ffn." not in k and ".shared_ffn." not in k]
    state |= mean_state(states, backbone)
    gen = torch.Generator().manual_seed(seed)
    shared, g0 = [], 0
    for s, sd in zip(sources, states):
        shared.append(place_groups(state, cfg, s, sd, g0, noise, gen))
        g0 += s.groups
    if cfg.shared_hidden:
        for layer in range(cfg.n_layer):
            for k in shared[0][layer]:
                state[f"blocks.{layer}.shared_ffn.{k}"] = torch.stack(
                    [parts[layer][k] for parts in shared]).mean(0)
    model.load_state_dict(state)
    return model


def corpus_batches(corpus_spec, tokenizer, cfg: HiMoEConfig, seed: int):
    """FIT_BATCHES batches of a source's corpus (its training side), as a run draws,
    and that side's token count."""
    corpus = open_corpus(corpus_spec)
    missing = unknown_chars(corpus, tokenizer)
    if missing:
        raise UserError(f"corpus {corpus.source} has characters the sources' tokenizer lacks: "
                        f"{''.join(missing)!r}; pass each branch's own corpus with --corpus")
    train, _ = token_splits(corpus, tokenizer, cfg.block_size)
    gen = torch.Generator().manual_seed(seed)
    return [get_batch(train, min(cfg.batch_size, 16), cfg.block_size, gen)[0]
            for _ in range(FIT_BATCHES)], len(train)


def token_shares(counts: list[float]) -> list[float]:
    """Each group's share of the corpora's tokens (config.group_shares), rounded for
    config.json."""
    return [round(n / sum(counts), 6) for n in counts]


def router_inputs(model: HiMoEModel, layer: int, batches) -> torch.Tensor:
    """What layer `layer`'s router sees (its LayerNorm's output) over the batches: [T, D]."""
    seen = []
    hook = model.blocks[layer].ln2.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            for x_BT in batches:
                model(x_BT)
    finally:
        hook.remove()
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in seen])


def fit_level1_rows(model: HiMoEModel, groups: dict[int, list], others: list | None = None):
    """Fit the level-1 rows of the dense sources' groups (groups: {group: its batches}), one
    layer after another (the module docstring's rule); every other row stays as it is.
    others: batches of the corpus the model's other groups know (merge --into), each token
    labelled with the old group level 1 picks for it now."""
    model.eval()
    free = list(groups)
    for layer in range(model.cfg.n_layer):
        router = model.blocks[layer].ffn.router
        w_ND = router.main_weight_ND.detach().clone()
        seen = {g: router_inputs(model, layer, b) for g, b in groups.items()}
        x_TD = torch.cat(list(seen.values()))
        y_T = torch.cat([torch.full((len(h_TD),), g) for g, h_TD in seen.items()])
        if others:
            h_TD = router_inputs(model, layer, others)
            old_N = torch.ones(len(w_ND), dtype=torch.bool)
            old_N[free] = False
            logits_TN = (h_TD @ w_ND.t()).masked_fill(~old_N, float("-inf"))
            x_TD, y_T = torch.cat([x_TD, h_TD]), torch.cat([y_T, logits_TN.argmax(1)])
        with torch.no_grad():
            router.main_weight_ND[free] = fitted_rows(w_ND, free, x_TD, y_T)


def fitted_rows(w_ND: torch.Tensor, free: list[int], x_TD: torch.Tensor,
                y_T: torch.Tensor) -> torch.Tensor:
    """The rows `free` of w_ND (the others held) that minimise the cross-entropy of
    softmax(x_TD @ w.T) against the labels y_T, each label's tokens weighing the same in all
    (a small domain's tokens count as much as a large one's), plus FIT_L2 times the rows'
    squared norm."""
    counts_N = torch.bincount(y_T, minlength=len(w_ND)).float()
    weight_N = torch.where(counts_N > 0, len(y_T) / (counts_N * (counts_N > 0).sum()), 0.0)
    rows_FD = torch.zeros(len(free), w_ND.shape[1], requires_grad=True)
    fit = torch.optim.LBFGS([rows_FD], max_iter=FIT_ITERS, line_search_fn="strong_wolfe")
    index = (torch.tensor(free),)

    def loss():
        fit.zero_grad()
        w = w_ND.index_put(index, rows_FD)
        value = F.cross_entropy(x_TD @ w.t(), y_T, weight_N) + FIT_L2 * (rows_FD ** 2).sum()
        value.backward()
        return value

    fit.step(loss)
    return rows_FD.detach()


def own_group_share(model: HiMoEModel, groups: dict[int, list]) -> list[list[float]]:
    """Per layer, per dense source: the share of its own corpus's tokens level 1 sends to
    its group."""
    model.eval()
    M = model.cfg.num_experts
    shares = [[0.0] * len(groups) for _ in range(model.cfg.n_layer)]
    for i, (g, batches) in enumerate(groups.items()):
        hits = [0] * model.cfg.n_layer
        total = 0
        with torch.no_grad():
            for x_BT in batches:
                model(x_BT)
                total += x_BT.numel()
                for layer, moe in model.moe_layers.items():
                    hits[layer] += int((moe.last_ids_TK[:, 0] // M == g).sum())
        for layer in range(model.cfg.n_layer):
            shares[layer][i] = hits[layer] / total
    return shares


def merge(paths: list[Path], model_dir: Path, given: dict, corpora: list[str] | None,
          noise: float, seed: int, force: bool) -> str:
    """Write the merged model of the sources to model_dir in one atomic save, under the
    directory's lock; returns one line saying what was written."""
    paths, model_dir = [Path(p) for p in paths], Path(model_dir)
    if not math.isfinite(noise) or noise < 0:
        raise UserError(f"--noise must be a finite number >= 0, got {noise}; e.g. 0.01")
    checkpoint.check_model_dir_flag(str(model_dir))
    for path in paths:
        if model_dir.exists() and model_dir.resolve() == path.resolve():
            raise UserError(f"--model_dir {model_dir} is one of the --from models; write the "
                            "merged model to a new directory")
    sources = read_sources(paths)
    if corpora is not None and len(corpora) != len(sources):
        raise UserError(f"--corpus was given {len(corpora)} times for {len(sources)} --from "
                        "models; give one per --from, in the same order, or none")
    cfg = merged_config(sources, given)
    checkpoint.check_model_dir_writable(model_dir)
    with checkpoint.new_model_dir_lock(model_dir, force):
        models = [checkpoint.load_model(s.path)[0] for s in sources]
        tokenizer = checkpoint.load_tokenizer(sources[0].path)
        model = merged_model(sources, models, cfg, noise, seed)
        groups, tokens, g0 = {}, {}, 0
        for i, s in enumerate(sources):
            if s.dense:
                spec = corpora[i] if corpora is not None else s.cfg.data_file
                groups[g0], tokens[g0] = corpus_batches(spec, tokenizer, cfg, seed)
            g0 += s.groups
        if len(tokens) == cfg.num_moes:  # every group a branch whose corpus is known
            # (config.json's only: the router reads them in training, not here)
            cfg = dataclasses.replace(cfg, group_shares=token_shares(list(tokens.values())))
        if len(groups) >= 2:  # one dense group alone has no other tokens to tell apart
            fit_level1_rows(model, groups)
        shares = own_group_share(model, groups) if groups else []
        checkpoint.save_model(model, sources[0].vocab, 0, model_dir, config=cfg, extra={
            checkpoint.TRAIN_STATE_FILE: fresh_train_state(model, cfg, None),
            checkpoint.METRICS_FILE: "", **tokenizer.files()})
    total, active = model.parameter_counts()
    routed = "; level 1 sends each dense branch's own tokens to its group: " + ", ".join(
        f"layer {layer + 1} " + " / ".join(f"{x:.0%}" for x in row)
        for layer, row in enumerate(shares)) if shares else ""
    return (f"merged {len(sources)} models into {model_dir}: {cfg.n_layer} layer(s) of "
            f"{cfg.num_moes} groups x {cfg.num_experts} experts, {total / 1e6:.2f}M parameters, "
            f"{active / 1e6:.2f}M active{routed}. Step 0: fine-tune with `himoe train "
            f"--model_dir {model_dir} --resume --data_file MIX --max_iters K`")


def merge_into(model_dir: Path, source_dir: Path, corpora: list[str] | None, noise: float,
               seed: int) -> str:
    """Add the model in source_dir as new level-1 group(s) of the hierarchical model in
    model_dir. Written: the new groups' files, each layer's widened level-1 router,
    config.json and train_state.pt (the old parts' AdamW moments kept, zeros for the new);
    every other file byte for byte, in one atomic save (surgery.rewrite)."""
    model_dir, source_dir = Path(model_dir), Path(source_dir)
    if not math.isfinite(noise) or noise < 0:
        raise UserError(f"--noise must be a finite number >= 0, got {noise}; e.g. 0.01")
    if model_dir.resolve() == source_dir.resolve():
        raise UserError(f"--into {model_dir} is --from itself; add another model")
    target, source = read_sources([model_dir, source_dir])
    old = target.cfg
    if target.dense:
        raise UserError(f"--into {model_dir} is a dense model; merge it with --from "
                        "into a new --model_dir first, then add branches with --into")
    if corpora is not None and len(corpora) != 2:
        raise UserError(f"--corpus was given {len(corpora)} times; with --into give two, the "
                        "model's corpus then the new branch's, or none")
    # A new group's share until its corpus is counted (a hierarchical branch's never is):
    # the old groups' mean.
    provisional = None if old.group_shares is None else old.group_shares + [
        sum(old.group_shares) / old.num_moes] * source.groups
    new = dataclasses.replace(old, num_moes=old.num_moes + source.groups,
                              group_shares=provisional).validate()
    if source.dense and source.cfg.ffn_hidden - new.shared_hidden != new.ffn_hidden:
        raise UserError(f"--from {source_dir}'s FFN leaves experts "
                        f"{source.cfg.ffn_hidden - new.shared_hidden} wide but {model_dir}'s "
                        f"are {new.ffn_hidden}; add branches of the model's own seed")
    if not source.dense and (source.cfg.num_experts, source.cfg.ffn_hidden) != (
            new.num_experts, new.ffn_hidden):
        raise UserError(f"--from {source_dir}'s groups are {source.cfg.num_experts} experts "
                        f"{source.cfg.ffn_hidden} wide, {model_dir}'s "
                        f"{new.num_experts} x {new.ffn_hidden}; add a branch of the same shape")
    from himoe.edit.slots import moved_train_state
    from himoe.edit.surgery import current_manifest, rewrite, torch_writer

    current_manifest(model_dir)  # refuse a damaged directory before any work
    base, _, vocab, step = checkpoint.load_model(model_dir)
    branch = checkpoint.load_model(source_dir)[0]
    model = HiMoEModel(new)
    state = model.state_dict()
    state |= {k: v for k, v in base.state_dict().items() if ".ffn." not in k}
    gen = torch.Generator().manual_seed(seed)
    place_groups(state, new, target, base.state_dict(), 0, 0.0, gen)
    place_groups(state, new, source, branch.state_dict(), old.num_moes, noise, gen)
    model.load_state_dict(state)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    specs = corpora or [old.data_file, source.cfg.data_file]
    shares = ""
    if source.dense:
        batches, branch_tokens = corpus_batches(specs[1], tokenizer, new, seed)
        others, model_tokens = corpus_batches(specs[0], tokenizer, new, seed)
        groups = {old.num_moes: batches}
        if old.group_shares is not None:  # the old groups keep their ratios
            new = dataclasses.replace(new, group_shares=token_shares(
                [x * model_tokens / sum(old.group_shares) for x in old.group_shares]
                + [branch_tokens]))
        fit_level1_rows(model, groups, others=others)
        shares = "; level 1 sends the branch's own tokens to its group: " + ", ".join(
            f"layer {layer + 1} {row[0]:.0%}"
            for layer, row in enumerate(own_group_share(model, groups)))
    files = checkpoint.to_files(model)
    rels = [card_layout.main_router_file(new, layer) for layer in range(new.n_layer)]
    rels += [rel for rel in files for layer in range(new.n_layer)
             for g in range(old.num_moes, new.num_moes)
             if rel.startswith(card_layout.group_dir(new, layer, g) + "/")]
    writers = {rel: torch_writer(files[rel]) for rel in rels}
    writers[checkpoint.CONFIG_FILE] = lambda f: f.write(checkpoint.config_bytes(new, vocab,
                                                                                step))
    if safe_path.lstat(model_dir, checkpoint.TRAIN_STATE_FILE) is not None:
        train_state = checkpoint.load_weight_file(model_dir, checkpoint.TRAIN_STATE_FILE,
                                                  plain=False)
        n = old.num_experts
        writers[checkpoint.TRAIN_STATE_FILE] = torch_writer(moved_train_state(
            train_state, old, new, lambda layer, g: list(range(n)) if g < old.num_moes
            else [None] * n))
    rewrite(model_dir, writers)
    return (f"added {source_dir} to {model_dir} as group(s) {old.num_moes + 1}-"
            f"{new.num_moes} of every layer{shares}; every other file is as it was. Continue "
            f"with `himoe train --model_dir {model_dir} --resume --max_iters K`")
