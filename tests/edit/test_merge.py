"""`himoe merge`: branches of one seed joined as the level-1 groups of one model."""

import importlib.util
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

from himoe.checkpoint import atomic_dir, card_layout
from himoe.checkpoint import card as checkpoint
from himoe.edit.upcycle import dense_parts
from himoe.training.trainer import Trainer
from tests.checkpoint.test_crash_safety import (
    ROOT,
    STAGING,
    digests,
    kill,
    staging_has_files,
    wait_for,
)
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.conftest import tiny_config

ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n"
# Two domains over one alphabet: the first mostly the first half, the second the second.
DOMAIN_A = ALPHABET + "abc def ghij klm abba cab fig jam.\n" * 30
DOMAIN_B = ALPHABET + "nop qrs tuvw xyz onus rust zoo vox.\n" * 30
SMALL = dict(n_embd=16, block_size=16, batch_size=4, eval_iters=1, sample_tokens=8)


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    """A dense seed trained on both domains, and a branch of it on each."""
    root = tmp_path_factory.mktemp("merge")
    for name, text in (("a.txt", DOMAIN_A), ("b.txt", DOMAIN_B), ("mix.txt",
                                                                  DOMAIN_A + DOMAIN_B)):
        (root / name).write_text(text)
    seed = tiny_config(**SMALL, router="dense", max_iters=6, eval_interval=6,
                       data_file=str(root / "mix.txt"), model_dir=str(root / "seed"))
    Trainer(seed, out=io.StringIO()).train()
    for name in ("a", "b"):
        cfg = tiny_config(**SMALL, router="dense", max_iters=20, eval_interval=20, lr=3e-3,
                          data_file=str(root / f"{name}.txt"), model_dir=str(root / name))
        Trainer(cfg, out=io.StringIO(), init_from=root / "seed").train()
    return root


def merge_cli(root, capsys, *extra, out="m"):
    return himoe(["merge", "--from", root / "a", "--from", root / "b", "--model_dir",
                  root / out, *extra], capsys)


def test_merged_weights_are_the_branches_parts(branches, capsys):
    code, out, err = merge_cli(branches, capsys, "--num_experts", "4", "--force")
    assert code == 0, err
    assert "level 1 sends each dense branch's own tokens to its group" in out
    merged, cfg, _, step = checkpoint.load_model(branches / "m")
    a, cfg_a, _, _ = checkpoint.load_model(branches / "a")
    b, _, _, _ = checkpoint.load_model(branches / "b")
    assert step == 0 and cfg.num_moes == 2 and cfg.num_experts == 4
    ms, sa, sb = merged.state_dict(), a.state_dict(), b.state_dict()
    for key in ("tok_emb.weight", "blocks.0.attn.c_attn.weight", "blocks.1.ln2.bias"):
        if key in ms:
            torch.testing.assert_close(ms[key], (sa[key] + sb[key]) / 2)
    S, M, k = cfg.shared_hidden, cfg.num_experts, cfg.top_k_experts
    for layer in range(cfg.n_layer):
        shared_a, routed_a = dense_parts(sa, layer, S)
        shared_b, routed_b = dense_parts(sb, layer, S)
        torch.testing.assert_close(ms[f"blocks.{layer}.shared_ffn.fc1.weight"],
                                   (shared_a["fc1.weight"] + shared_b["fc1.weight"]) / 2)
        w2 = ms[card_layout.moe_key(layer, "experts.w2_EFD")].view(2, M, -1, cfg.n_embd)
        for g, routed in ((0, routed_a), (1, routed_b)):
            for j in range(M):  # every expert a copy, scaled so uniform level 2 sums to 1
                torch.testing.assert_close(w2[g, j], routed["fc2.weight"].t() * M / k)


def test_level_1_starts_by_domain(branches, capsys):
    code, out, err = merge_cli(branches, capsys, "--force")
    assert code == 0, err
    shares = [float(x.rstrip("%,")) for x in out.split("to its group: ")[1].split(".")[0]
              .replace("layer 1 ", "").replace("layer 2 ", "").replace("/", " ").split()]
    # The domains differ in their letters, not in spaces, dots and newlines (a fifth of
    # the tokens): the fitted level 1 sends most of each home (84-88% as written).
    assert len(shares) == 4 and all(s >= 75 for s in shares), out


def test_level_1_balances_towards_each_branchs_share_of_the_corpora(branches, capsys):
    (branches / "bbb.txt").write_text(DOMAIN_B * 3)
    code, _, err = merge_cli(branches, capsys, "--force", "--corpus", branches / "a.txt",
                             "--corpus", branches / "bbb.txt", out="m_shares")
    assert code == 0, err
    cfg = checkpoint.read_config(branches / "m_shares")[0]
    assert cfg.group_shares == pytest.approx([1 / 4, 3 / 4], abs=0.01)


def test_the_merged_model_verifies_resumes_and_generates(branches, capsys):
    code, _, err = merge_cli(branches, capsys, "--force", out="m2")
    assert code == 0, err
    for argv in (["verify", "--model_dir", branches / "m2"],
                 ["train", "--model_dir", branches / "m2", "--resume", "--data_file",
                  branches / "mix.txt", "--max_iters", "3", "--eval_interval", "3"],
                 ["generate", "--model_dir", branches / "m2", "--max_new_tokens", "8"],
                 ["experts", "list", "--model_dir", branches / "m2"],
                 ["analyze", "--model_dir", branches / "m2", "--domain",
                  f"a={branches / 'a.txt'}", "--domain", f"b={branches / 'b.txt'}",
                  "--no_plots"]):
        code, _, err = himoe(argv, capsys)
        assert code == 0, (argv[0], err)
    assert checkpoint.read_config(branches / "m2")[2] == 3
    if importlib.util.find_spec("transformers") is not None:  # the hf extra
        code, _, err = himoe(["export-hf", "--model_dir", branches / "m2", "--out",
                              branches / "m2-hf"], capsys)
        assert code == 0, err


def test_a_merge_into_a_directory_another_writer_holds_is_refused(branches, tmp_path):
    """A merge takes the directory's writer lock, as training does: while another process
    writes there, it stops with one line and writes nothing."""
    lock = atomic_dir.WriterLock(tmp_path / "busy", create=True)
    lock.acquire()
    try:
        r = subprocess.run([sys.executable, "-m", "himoe", "merge", "--from", branches / "a",
                            "--from", branches / "b", "--model_dir", tmp_path / "busy"],
                           capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    assert r.returncode == 2 and "is in use" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "busy" / "config.json").exists()


@pytest.mark.parametrize("case, needle", [
    ("one", "needs two or more --from models"),
    ("twice", "is named twice"),
    ("shape", "has n_embd 32 but"),
    ("not a model", "not_a_model"),
    ("model there", "already holds"),
    ("corpus count", "--corpus was given 1 times"),
])
def test_bad_merges_are_one_line(branches, tmp_path, capsys, case, needle):
    if case == "shape":
        cfg = tiny_config(**(SMALL | {"n_embd": 32}), router="dense", max_iters=1,
                          eval_interval=1, data_file=str(branches / "a.txt"),
                          model_dir=str(tmp_path / "wide"))
        Trainer(cfg, out=io.StringIO()).train()
        capsys.readouterr()  # its progress bar
    (tmp_path / "not_a_model").mkdir()
    argv = {"one": ["--from", branches / "a"],
            "twice": ["--from", branches / "a", "--from", branches / "a"],
            "shape": ["--from", branches / "a", "--from", tmp_path / "wide"],
            "not a model": ["--from", branches / "a", "--from", tmp_path / "not_a_model"],
            "model there": ["--from", branches / "a", "--from", branches / "b"],
            "corpus count": ["--from", branches / "a", "--from", branches / "b", "--corpus",
                             branches / "a.txt"]}[case]
    target = branches / "seed" if case == "model there" else tmp_path / "out"
    code, _, err = himoe(["merge", *argv, "--model_dir", target], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_hierarchical_sources_bring_their_groups_whole(branches, tmp_path, capsys):
    for name in ("ha", "hb"):
        cfg = tiny_config(**SMALL, num_moes=2, num_experts=2, max_iters=2, eval_interval=2,
                          data_file=str(branches / f"{name[1]}.txt"),
                          model_dir=str(tmp_path / name))
        Trainer(cfg, out=io.StringIO()).train()
    capsys.readouterr()
    code, _, err = himoe(["merge", "--from", tmp_path / "ha", "--from", tmp_path / "hb",
                          "--model_dir", tmp_path / "m"], capsys)
    assert code == 0, err
    merged, cfg, _, _ = checkpoint.load_model(tmp_path / "m")
    hb, _, _, _ = checkpoint.load_model(tmp_path / "hb")
    assert cfg.num_moes == 4 and cfg.num_experts == 2
    ms, sb = merged.state_dict(), hb.state_dict()
    for layer in range(cfg.n_layer):
        r = card_layout.moe_key(layer, "router.")
        assert torch.equal(ms[r + "main_weight_ND"][2:], sb[r + "main_weight_ND"])
        assert torch.equal(ms[r + "group_weight_NMD"][2:], sb[r + "group_weight_NMD"])
        w1 = card_layout.moe_key(layer, "experts.w1_EDF")
        assert torch.equal(ms[w1][4:], sb[w1])  # hb's 2 groups x 2 experts, after ha's


def test_into_adds_a_branch_and_keeps_every_other_file(branches, tmp_path, capsys):
    code, _, err = merge_cli(branches, capsys, "--force", out="m3")
    assert code == 0, err
    m = branches / "m3"
    code, _, err = himoe(["train", "--model_dir", m, "--resume", "--data_file",
                          branches / "mix.txt", "--max_iters", "2", "--eval_interval", "2"],
                         capsys)
    assert code == 0, err
    before = {p.relative_to(m): p.read_bytes() for p in m.rglob("*.pt")}
    shutil.copytree(m, branches / "m3_before", dirs_exist_ok=True)
    old_state = torch.load(m / "train_state.pt", weights_only=True)
    old_shares = checkpoint.read_config(m)[0].group_shares
    # A third domain: a branch of the same seed on the first domain's text again.
    cfg = tiny_config(**SMALL, router="dense", max_iters=4, eval_interval=4,
                      data_file=str(branches / "a.txt"), model_dir=str(tmp_path / "c"))
    Trainer(cfg, out=io.StringIO(), init_from=branches / "seed").train()
    capsys.readouterr()
    code, out, err = himoe(["merge", "--into", m, "--from", tmp_path / "c", "--corpus",
                            branches / "mix.txt", "--corpus", branches / "a.txt"], capsys)
    assert code == 0, err
    grown_model, cfg_m, _, step = checkpoint.load_model(m)
    assert cfg_m.num_moes == 3 and step == 2
    old_model = checkpoint.load_model(branches / "m3_before")[0]
    for layer in range(cfg_m.n_layer):  # the fit sets the new group's row only
        r = card_layout.moe_key(layer, "router.main_weight_ND")
        assert torch.equal(grown_model.state_dict()[r][:2], old_model.state_dict()[r])
    assert "level 1 sends the branch's own tokens to its group" in out
    # Level-1 targets: the old groups keep their ratio and share the model's corpus (mix);
    # the new one gets a.txt's share of the two corpora (a third of them, to rounding).
    a, b, c = cfg_m.group_shares
    assert a / b == pytest.approx(old_shares[0] / old_shares[1], rel=1e-4)
    assert c == pytest.approx(1 / 3, abs=0.02) and a + b + c == pytest.approx(1.0)
    after = {p.relative_to(m): p.read_bytes() for p in m.rglob("*.pt")}
    changed = {str(rel) for rel in before if after[rel] != before[rel]}
    # Only each layer's level-1 router and the training state change; the rest is bytes.
    assert changed == {"train_state.pt", "layer_01_main_router.pt", "layer_02_main_router.pt"}
    assert {str(r) for r in set(after) - set(before)} == {
        f"layer_{i:02d}_moe_expert_003/{f}" for i in (1, 2)
        for f in ["router.pt"] + [f"model_{j:03d}.pt" for j in range(1, cfg_m.num_experts + 1)]}
    new_state = torch.load(m / "train_state.pt", weights_only=True)
    assert new_state["step"] == old_state["step"]
    grown = 0
    for i, slot in old_state["optimizer"]["state"].items():  # old moments kept, new ones 0
        for k in ("exp_avg", "exp_avg_sq"):
            v, w = slot[k], new_state["optimizer"]["state"][i][k]
            assert torch.equal(w[:v.shape[0]], v), (i, k)  # the new groups come last
            assert not w[v.shape[0]:].any()
            grown += w.shape[0] > v.shape[0]
    assert grown  # the stacked experts, group routers and level-1 rows grew
    code, _, err = himoe(["train", "--model_dir", m, "--resume", "--data_file",
                          branches / "mix.txt", "--max_iters", "4", "--eval_interval", "2"],
                         capsys)
    assert code == 0, err


@pytest.mark.slow  # four processes that import torch
def test_sigkill_leaves_nothing_half_written(branches, tmp_path, capsys):
    """`merge` killed inside its save's writes leaves no model in --model_dir; `merge
    --into` killed there leaves the model byte for byte as it was; killed after the commit
    point, the next reader completes either save."""
    out = tmp_path / "m"
    staging = out / STAGING
    began, committed = (lambda: staging_has_files(staging),
                        lambda: (staging / "manifest.json").exists())

    def killed_at(point, *argv):
        """`himoe merge argv` killed once point() holds; what verify then says."""
        env = dict(os.environ, OMP_NUM_THREADS="1", **{atomic_dir.SLOW_SAVE_ENV: "0.02"})
        proc = subprocess.Popen([sys.executable, "-m", "himoe", "merge", *map(str, argv)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        wait_for(proc, point, "the save to begin" if point is began else "the commit point")
        kill(proc)
        return himoe(["verify", "--model_dir", out], capsys)

    new = ("--from", branches / "a", "--from", branches / "b", "--model_dir", out)
    code, _, err = killed_at(began, *new)
    assert "discarded an interrupted save" in err, err
    assert not (out / "manifest.json").exists() and not (out / "config.json").exists()
    code, _, err = killed_at(committed, *new)
    assert code == 0 and "completed an interrupted save" in err, err
    assert checkpoint.read_config(out)[0].num_moes == 2
    before = digests(out)
    into = ("--into", out, "--from", branches / "b", "--corpus", branches / "mix.txt",
            "--corpus", branches / "b.txt")
    code, _, err = killed_at(began, *into)
    assert code == 0 and "discarded an interrupted save" in err, err
    assert digests(out) == before
    code, _, err = killed_at(committed, *into)
    assert code == 0 and "completed an interrupted save" in err, err
    assert checkpoint.read_config(out)[0].num_moes == 3


@pytest.mark.parametrize("argv, needle", [
    (lambda b: ["--into", b / "seed", "--from", b / "a"], "is a dense model"),
    (lambda b: ["--into", b / "a", "--from", b / "a"], "is --from itself"),
    (lambda b: ["--into", b / "m", "--from", b / "a", "--from", b / "b"], "exactly one --from"),
    (lambda b: ["--from", b / "a", "--from", b / "b"], "needs --model_dir"),
])
def test_bad_into_is_one_line(branches, capsys, argv, needle):
    code, _, err = himoe(["merge", *argv(branches)], capsys)
    assert_one_line_error(code, err, needle)


def test_fitted_rows_minimise_the_penalised_cross_entropy():
    from himoe.edit.merge import FIT_L2, fitted_rows
    gen = torch.Generator().manual_seed(0)
    centres_GD = torch.randn(3, 8, generator=gen) * 2
    y_T = torch.cat([torch.full((n,), g) for g, n in enumerate((200, 400, 50))])
    x_TD = centres_GD[y_T] + torch.randn(len(y_T), 8, generator=gen)
    w_ND = torch.randn(3, 8, generator=gen)  # row 0 is held, rows 1 and 2 are fitted
    rows = fitted_rows(w_ND, [1, 2], x_TD, y_T).requires_grad_()
    w = torch.cat([w_ND[:1], rows])
    # every label's tokens weigh the same in all: 200, 400 and 50 tokens
    per_token_T = torch.nn.functional.cross_entropy(x_TD @ w.t(), y_T, reduction="none")
    value = sum(per_token_T[y_T == g].mean() for g in range(3)) / 3 + FIT_L2 * (rows ** 2).sum()
    value.backward()
    assert rows.grad.norm() < 1e-4  # a stationary point of a convex objective: its minimum
    assert ((x_TD @ w.t()).argmax(1) == y_T).float().mean() > 0.8
