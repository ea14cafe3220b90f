"""The run component: generators, metrics and images to the trackers, checkpoints with the GradScaler."""

import json

import pytest
import torch
from accelerate.tracking import GeneralTracker
from PIL import Image

from mmalign.config import TASKS, import_object
from mmalign.prompts import PromptSource
from mmalign.trainers.run import Run, seeded_generator


class Recorder(GeneralTracker):
    """An accelerate tracker that keeps what it is given."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.rows, self.images = [], []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.rows.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, values))


def test_generators_depend_on_every_key_and_nothing_else():
    draw = lambda *keys: torch.randint(1000, (4,), generator=seeded_generator(*keys)).tolist()  # noqa: E731
    assert draw(0, 3, 1, 2) == draw(0, 3, 1, 2)
    assert len({tuple(draw(*k)) for k in [(0, 3, 1, 2), (1, 3, 1, 2), (0, 4, 1, 2), (0, 3, 2, 2), (0, 3, 1, 3)]}) == 5


def test_metrics_and_images_reach_the_log_and_the_trackers(tmp_path):
    recorder = Recorder()
    run = Run(PromptSource(world="train"), tmp_path / "run", seed=0, trackers=[recorder], progress=False)
    run.log({"reward/mean": 0.5, "note": "text"}, step=3)
    run.log_images({"samples": Image.new("RGB", (4, 4))}, step=3)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"reward/mean": 0.5, "note": "text"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world"] == "train"
    assert recorder.rows == [(3, {"reward/mean": 0.5})]  # numbers only
    assert recorder.images[0][0] == 3 and list(recorder.images[0][1]) == ["samples"]
    run.cleanup()


def test_checkpoints_restore_weights_optimizer_and_grad_scaler(tmp_path, capsys):
    weight = torch.nn.Parameter(torch.ones(3))
    run = Run(PromptSource(world="train"), tmp_path / "run", seed=0)
    run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # what fp16 on CUDA would hold
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.ones(3)
    optimizer.step()
    run.accelerator.scaler.scale(torch.ones(()))  # the scaler starts its state lazily
    run.accelerator.scaler.update(new_scale=123.0)
    run.save_checkpoint(4, 7, {"w": weight}, optimizer, {"extra": torch.tensor([1.0])}, keep=2)
    saved = weight.detach().clone()

    again = torch.nn.Parameter(torch.zeros(3))
    other = Run(PromptSource(world="train"), tmp_path / "run", seed=0)
    other.accelerator.scaler = torch.amp.GradScaler("cpu")
    optimizer2 = torch.optim.AdamW([again], lr=0.1)
    checkpoint = other.resume({"w": again}, optimizer2)
    assert torch.equal(again.detach(), saved) and checkpoint.state["step"] == 7
    assert other.accelerator.scaler.get_scale() == 123.0
    assert optimizer2.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert "resuming from" in capsys.readouterr().out and torch.equal(checkpoint.extra["extra"], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="lacks trained parameters"):
        other.resume({"w": again, "v": again}, optimizer2)


@pytest.mark.parametrize("task", [t for t, entry in TASKS.items() if entry.trainer])
def test_every_trainer_in_the_task_table_follows_the_protocol(task):
    """``mmalign.trainers.Trainer``: what ``mmalign train`` calls."""
    trainer = import_object(TASKS[task].trainer)
    for method in ("setup", "train", "report", "export", "cleanup"):
        assert callable(getattr(trainer, method, None)), (task, method)
    assert import_object(TASKS[task].config).model_fields["task"].default == task  # the table agrees with the schema
