"""`himoe merge`: one hierarchical model from branches trained apart (himoe.edit.merge)."""

from __future__ import annotations

from pathlib import Path

from himoe.cli.options import seed_flag
from himoe.cli.train import add_config_flags, given_settings
from himoe.cli.upcycle import FLAGS

DESCRIPTION = (
    "Writes one hierarchical model whose level-1 groups are the --from models: branches of "
    "one seed (himoe train --init_from SEED), each trained on its own corpus. Embeddings, "
    "attention, LayerNorms and the shared expert are the sources' mean; a dense source's FFN "
    "becomes one group of copies of its routed units, as `himoe upcycle` splits it; a "
    "hierarchical source brings its groups whole. The dense branches' level-1 rows are "
    "fitted on their own corpora (--corpus, else the corpus each was trained on) so that "
    "each group first receives its own domain's tokens. The result is at step 0: "
    "fine-tune it on the mix with `himoe train --model_dir M --resume --data_file MIX "
    "--max_iters K` (docs/merge.md).")


def cmd_merge(args) -> int:
    from himoe.edit.merge import merge, merge_into
    from himoe.errors import UserError

    if args.into is None:
        if args.model_dir is None:
            raise UserError("himoe merge needs --model_dir for the merged model (or --into M "
                            "to add one branch to a merged model)")
        print(merge([Path(p) for p in args.from_dirs], Path(args.model_dir),
                    given_settings(args), args.corpus, args.noise, args.seed, args.force))
        return 0
    given = set(given_settings(args)) - {"seed", "model_dir"}
    if len(args.from_dirs) != 1 or args.model_dir is not None or given or args.force:
        raise UserError("--into M adds one --from branch to M in place: give exactly one "
                        "--from and no --model_dir, --force or routing flags")
    print(merge_into(Path(args.into), Path(args.from_dirs[0]), args.corpus, args.noise,
                     args.seed))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="join models trained apart as the level-1 groups of one "
                                     "hierarchical model", description=DESCRIPTION)
    p.add_argument("--from", dest="from_dirs", action="append", required=True, metavar="DIR",
                   help="a source model (give two or more, each once)")
    p.add_argument("--model_dir", "--model-dir", default=None,
                   help="where the merged model goes (new or empty, or --force)")
    p.add_argument("--into", default=None, metavar="M",
                   help="instead of --model_dir: add the one --from model as new level-1 "
                        "group(s) of the merged model M, every other file byte for byte")
    p.add_argument("--corpus", action="append", default=None, metavar="DATA",
                   help="the corpus of each --from, in the same order (with --into: M's, then "
                        "the branch's); default: the one each was trained on (config.json)")
    add_config_flags(p, only=tuple(f for f in FLAGS if f not in ("router", "num_moes",
                                                                 "top_k_groups")))
    p.add_argument("--noise", type=float, default=0.0,
                   help="relative noise on each copied expert's weights (default: 0)")
    p.add_argument("--seed", type=seed_flag, default=0, help="seed of the noise and of the "
                                                            "batches that place the groups")
    p.add_argument("--force", action="store_true",
                   help="replace the himoe model already in --model_dir (a folder of other "
                        "files is never written to)")
    p.set_defaults(func=cmd_merge)
