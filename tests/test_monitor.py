"""wcond.monitor: the same numbers as inspect, logged during training (Lightning, TensorBoard, or a dict)."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import wcond
from wcond.monitor import WeightMonitor


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=4),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_compute_matches_inspect_of_the_module() -> None:
    model = _net()
    mon = WeightMonitor(metrics=["acv_mean", "conv_similarity", "rare_cols", "near_parallel_rows"])
    values = mon.compute(model)
    report = wcond.inspect(model)
    want = {
        f"wcond/{m}/{r.name}": r.value(m)
        for r in report.layers
        for m in mon.metrics
        if r.value(m) is not None
    }
    assert values == want
    assert "wcond/conv_similarity/4.weight" not in values  # CS does not apply to the Linear
    # The grouped conv's CS is taken within its 4 groups, known from the module.
    assert values["wcond/conv_similarity/2.weight"] == pytest.approx(
        float(wcond.metrics.conv_similarity(model[2].weight.detach(), groups=4)), rel=1e-6
    )
    assert not any(p.grad is not None for p in model.parameters())


def test_layer_globs_and_bad_arguments() -> None:
    mon = WeightMonitor(metrics="norm_loss", layers="2.*")
    assert list(mon.compute(_net())) == ["wcond/norm_loss/2.weight"]
    with pytest.raises(
        wcond.UsageError,
        match="metrics=\\['acv_man'\\]: unknown metric 'acv_man' \\(did you mean 'acv_mean'\\?\\); "
        "one of: acv_sum, acv_mean",
    ):
        WeightMonitor(metrics=["acv_man"])
    with pytest.raises(wcond.UsageError, match="metrics=\\[\\]: choose from acv_sum, acv_mean"):
        WeightMonitor(metrics=[])
    with pytest.raises(wcond.UsageError, match="every_n_steps=0: must be at least 1"):
        WeightMonitor(every_n_steps=0)
    with pytest.raises(wcond.UsageError, match="no weight matches layers=\\['nothing\\*'\\]"):
        WeightMonitor(layers="nothing*").compute(_net())


def test_the_table_labels_name_metrics_and_values_are_logged_by_full_name() -> None:
    mon = WeightMonitor(metrics=["acv", "cs_n", "acv_mean"], layers="2.*")
    assert mon.metrics == ("acv_mean", "conv_similarity_norm")
    assert sorted(mon.compute(_net())) == [
        "wcond/acv_mean/2.weight",
        "wcond/conv_similarity_norm/2.weight",
    ]


def test_step_returns_a_dict_only_when_due() -> None:
    model = _net()
    mon = WeightMonitor(every_n_steps=3, metrics=["acv_mean"])
    got = [mon.step(model, s) for s in range(7)]
    assert [s for s, v in enumerate(got) if v is not None] == [0, 3, 6]
    assert got[0] == mon.compute(model)


def test_summary_writer_events_parse_with_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = WeightMonitor(every_n_steps=2, metrics=["acv_mean", "norm_loss"])
    expected: dict[int, dict[str, float]] = {}
    writer = SummaryWriter(log_dir=str(tmp_path))
    for step in range(5):
        values = mon.step(model, step, writer)
        if values is not None:
            expected[step] = values
        _train(model, opt)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert sorted(tags) == sorted(expected[0])
    tag = "wcond/norm_loss/0.weight"
    events = acc.Scalars(tag)
    assert [e.step for e in events] == [0, 2, 4]
    assert [e.value for e in events] == pytest.approx(
        [expected[s][tag] for s in (0, 2, 4)], rel=1e-6
    )
    assert events[0].value != events[2].value  # the weights moved, and the log shows it


def test_lightning_callback_logs_through_the_trainers_logger(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from wcond.monitor import WeightMetrics

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(
            self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
        ) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    callback = WeightMetrics(
        every_n_steps=2, metrics=["acv_mean", "conv_similarity"], layers="*net.[02].weight"
    )
    assert isinstance(callback, L.Callback)
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=CSVLogger(str(tmp_path), name="run"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=50,  # the callback does not depend on Lightning's own logging interval
    )
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "num_workers" advice and the like
        trainer.fit(module, loader)
    rows = list(csv.DictReader(open(next(tmp_path.glob("run/*/metrics.csv")))))
    by_step = {int(r["step"]): r for r in rows}
    assert sorted(by_step) == [0, 2, 4, 6]
    keys = {
        "wcond/acv_mean/net.0.weight",
        "wcond/acv_mean/net.2.weight",
        "wcond/conv_similarity/net.0.weight",
        "wcond/conv_similarity/net.2.weight",
    }
    assert keys <= set(rows[0]) and not any("net.4" in k for k in rows[0])
    # At step 6 (the last optimizer step) the logged numbers are inspect's on the final weights.
    final = {r.name: r for r in wcond.inspect(module).layers}
    for key in keys:
        metric, layer = key.split("/")[1:]
        assert float(by_step[6][key]) == pytest.approx(final[layer].value(metric), rel=1e-6)
    assert float(by_step[0]["wcond/acv_mean/net.0.weight"]) != float(
        by_step[6]["wcond/acv_mean/net.0.weight"]
    )


def test_without_lightning_the_callback_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import wcond.monitor as monitor

    monkeypatch.delitem(monitor.__dict__, "WeightMetrics", raising=False)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(wcond.UsageError, match=r"pip install 'wcond\[lightning\]'"):
        monitor.WeightMetrics  # noqa: B018
