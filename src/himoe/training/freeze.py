"""--train_only SPEC: train the named weight files of a model, keep every other one exactly.

The experts of a layer are one stacked tensor (w1_EDF, ...) and the level-2 routers one
[N, M, D] tensor, so a file is often a slice of a parameter
(himoe.checkpoint.card_layout.owner_files says which file owns which rows). A parameter
with nothing to train gets requires_grad False (AdamW then skips it: no update, no weight
decay). A parameter with some rows to train keeps its gradient, with a hook that zeroes the
frozen rows (so they do not count towards gradient clipping). AdamW's moments and weight decay
would still move those rows, so after every optimiser step they are put back from a copy
taken at the start: exact, whatever the optimiser does. Router buffers that change in
training (loss-free balancing biases, a logit EMA) are put back the same way.
"""

from __future__ import annotations

import torch

from himoe.checkpoint.card_layout import owner_files
from himoe.edit.specs import weight_files
from himoe.model import HiMoEModel


class Freezer:
    def __init__(self, model: HiMoEModel, train_files: set[str]):
        cfg = model.cfg
        self.train_files = [f for f in weight_files(cfg) if f in train_files]
        self.frozen_files = tuple(f for f in weight_files(cfg) if f not in train_files)
        self._restore: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._hooks = []
        seen = set()
        # keep_vars: the Parameters and persistent buffers themselves (the tied LM head once).
        for key, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            owners = owner_files(cfg, key)
            is_param = isinstance(tensor, torch.nn.Parameter)
            if isinstance(owners, str):
                if owners in train_files:
                    continue
                if is_param:
                    tensor.requires_grad_(False)
                else:
                    self._restore.append((tensor, None, tensor.detach().clone()))
                continue
            train_R = torch.tensor([f in train_files for f in owners], device=tensor.device)
            if bool(train_R.all()):
                continue
            if is_param and not bool(train_R.any()):
                tensor.requires_grad_(False)
                continue
            frozen_R = (~train_R).nonzero().flatten()
            self._restore.append((tensor, frozen_R, tensor.detach()[frozen_R].clone()))
            if is_param:
                mask = train_R.view(-1, *[1] * (tensor.dim() - 1)).to(tensor.dtype)
                self._hooks.append(tensor.register_hook(lambda g, m=mask: g * m))

    def summary(self) -> str:
        names = ", ".join(self.train_files[:6]) + (" ..." if len(self.train_files) > 6 else "")
        return (f"training only {len(self.train_files)} of "
                f"{len(self.train_files) + len(self.frozen_files)} weight files ({names}); "
                "the others stay exactly as they are")

    @torch.no_grad()
    def after_step(self) -> None:
        """Put the frozen rows back: AdamW's moments and weight decay may have moved them."""
        for tensor, rows_R, saved in self._restore:
            if rows_R is None:
                tensor.copy_(saved)
            else:
                tensor.index_copy_(0, rows_R, saved)
