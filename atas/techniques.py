"""The run-level training techniques of the FastAT benchmark, as the trainer uses them: weight
averaging (atas.averaging), the validation-based selection of raw vs averaged weights
(atas.selection) and the cost record (atas.cost). The trainer calls this in a few lines; the logic
lives here and in those modules (docs/algorithm.md, "Training techniques").
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from atas import cost
from atas.averaging import WeightAverage
from atas.selection import SELECTED, Selector, save_selected, selection_mode


class Techniques:
    """Weight average, selector and cost meter of one run (each None / inert when off)."""

    def __init__(self, cfg, model: nn.Module, device: torch.device, is_main: bool = True):
        t = cfg.train
        self.cfg, self.device = cfg, device
        self.mode = selection_mode(t.select, t.wa_tau, cfg.data.val_size)
        self.wa = WeightAverage(model, t.wa_tau, t.wa_start_epoch) if t.wa_tau > 0 else None
        self.selector = None
        if self.mode == "val" and is_main:  # rank 0 validates and writes selected.pt
            from atas.evaluation.run import load_val_set

            x, y = load_val_set(cfg)
            self.selector = Selector(x.to(device).float().div_(255), y.to(device), float(cfg.method.eps))

    # -- the loop's hooks ----------------------------------------------------------------------
    def after_step(self, epoch: int) -> None:
        if self.wa is not None:
            self.wa.update(epoch)

    def epoch_start(self) -> None:
        cost.start_epoch(self.device)

    def epoch_end(self, method) -> dict:
        return cost.epoch_cost(method, self.device)

    def validate(self, model: nn.Module, epoch: int, step: int, run_dir: Path) -> dict:
        """The benchmark's selection for the epoch (rank 0, val mode): its row entries; selected.pt
        is rewritten when the epoch's pick is the best so far."""
        if self.selector is None:
            return {}
        averaged = self.wa.module if self.wa is not None else None
        row, new = self.selector.judge(model, averaged, epoch, step)
        if new:
            chosen = averaged if row["val_pick"] == "averaged" and averaged is not None else model
            assert self.selector.best is not None  # `new`: judge() has just set it
            save_selected(Path(run_dir) / SELECTED, chosen, self.cfg.to_dict(), self.selector.best)
        return row

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {}
        if self.wa is not None:
            state["wa"] = self.wa.state_dict()
        if self.selector is not None:
            state["selection"] = self.selector.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.wa is not None and "wa" in state:
            self.wa.load_state_dict(state["wa"])
        if self.selector is not None and "selection" in state:
            self.selector.load_state_dict(state["selection"])

    # -- the end of the run --------------------------------------------------------------------
    def final(self, model: nn.Module, run_dir: Path | None, rows: list[dict]) -> tuple[nn.Module, dict]:
        """(the model the run hands on, what it is: {"weights", "rule", "epoch"?}) and cost.json."""
        if self.cfg is not None and run_dir is not None:
            cost.write_cost(Path(run_dir) / cost.COST_FILE, rows)
        if self.mode == "averaged" and self.wa is not None:  # (mode "averaged" comes with a weight average)
            return self.wa.module, {"weights": "averaged", "rule": "averaged"}
        if self.mode == "val" and self.selector is not None and self.selector.best is not None and run_dir is not None:
            from atas.export import load_model

            chosen, _, extra = load_model(Path(run_dir) / SELECTED, self.device)
            return chosen, {"weights": extra["weights"], "rule": "val", "epoch": extra["epoch"], "step": extra["step"]}
        return model, {"weights": "raw", "rule": self.mode}
