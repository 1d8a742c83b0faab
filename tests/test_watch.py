"""Watching a run: report_to (TensorBoard read back with its own reader, W&B offline, trackio), resume without
duplicated or lost steps, `qalign report`'s PNG and summary, and a clear exit 2 for a missing extra."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import add_dpo, write_recipe
from test_cli_sft import ENV, QALIGN, qalign, qalign_process, wait_for

from qalign.layout import StagePaths
from qalign.trackers import Trackers

pytest.importorskip("tensorboard")


def with_report_to(recipe: Path, *names: str) -> Path:
    data = yaml.safe_load(recipe.read_text())
    data["report_to"] = list(names)
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe


def records(stage: Path) -> list[dict]:
    lines = (stage / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if not r.get("final")]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard itself reads the folder (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same_as_metrics(stage: Path) -> None:
    """Every number of metrics.jsonl is in TensorBoard under its name at its step, and nothing else is."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records(stage):
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                expected.setdefault(key, []).append((record["step"], value))
    logged = tensorboard_scalars(stage / "tensorboard")
    assert sorted(logged) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.fixture(scope="module")
def sft_dpo_run(tmp_path_factory, tiny_model):
    """SFT then DPO, a few steps each with evals, reporting to TensorBoard."""
    folder = tmp_path_factory.mktemp("watched")
    recipe = write_recipe(folder, tiny_model("llama"), max_steps=4, eval_every=2, save_every=2)
    with_report_to(add_dpo(recipe, max_steps=3, eval_every=2), "tensorboard")
    result = qalign("run", str(recipe), cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, recipe, result


def test_tensorboard_has_the_metrics_jsonl_scalars_at_the_same_steps(sft_dpo_run):
    folder, _, result = sft_dpo_run
    run = folder / "runs" / "tiny"
    assert_same_as_metrics(run / "sft")
    assert_same_as_metrics(run / "dpo")
    assert "rewards/margin" in tensorboard_scalars(run / "dpo" / "tensorboard")
    # The end-of-stage line: time taken, throughput, peak memory; the totals also land in the final record.
    assert "sft done: 4 steps in 0:" in result.stdout and "tok/s; measured peak:" in result.stdout
    final = json.loads((run / "sft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["tokens"] > 0 and final["train_seconds"] > 0


def test_report_draws_a_png_and_summarizes_each_stage(sft_dpo_run):
    from PIL import Image

    folder, recipe, _ = sft_dpo_run
    result = qalign("report", str(recipe), cwd=folder)
    assert result.returncode == 0, result.stderr
    png = folder / "runs" / "tiny" / "report.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 400
    out = result.stdout
    assert "sft: 4 steps" in out and "dpo: 3 steps" in out
    assert "best" in out and "final eval at step 4" in out and "rewards/accuracy" in out
    assert "peak memory" in out and str(png) in out
    # A run folder works as well as its recipe, and --out puts the PNG elsewhere.
    other = folder / "elsewhere" / "curves.png"
    again = qalign("report", str(folder / "runs" / "tiny"), "--out", str(other), cwd=folder)
    assert again.returncode == 0, again.stderr
    assert other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --set applies to the recipe as everywhere else: another output_dir holds no run.
    moved = qalign("report", str(recipe), "--set", "output_dir=runs/none", cwd=folder)
    assert moved.returncode == 2 and "runs/none: holds no run" in moved.stderr


def test_report_refuses_a_folder_without_a_run(tmp_path):
    result = qalign("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "holds no run" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
    missing = qalign("report", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "no such recipe or run folder" in missing.stderr


def without(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """qalign with `module` made unimportable, as on a machine where its extra is not installed."""
    code = f"import sys; sys.modules[{module!r}] = None; from qalign.cli import main; sys.argv[0] = 'qalign'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def test_a_missing_extra_exits_2_naming_it_before_anything_is_written(tmp_path, tiny_model):
    recipe = with_report_to(write_recipe(tmp_path, tiny_model("llama"), max_steps=2), "tensorboard")
    result = without("tensorboard", "sft", str(recipe), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert 'pip install "qalign[tensorboard]"' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()

    drawn = without("matplotlib", "report", str(tmp_path), cwd=tmp_path)
    assert drawn.returncode == 2 and 'pip install "qalign[report]"' in drawn.stderr


def test_a_killed_run_resumes_into_the_same_tensorboard_log_without_duplicates_or_gaps(tmp_path, tiny_model):
    # Steps of one short row; kill -9 between checkpoints, so the log holds steps the resume trains again.
    recipe = write_recipe(
        tmp_path, tiny_model("llama"), max_steps=40, batch_size=1, grad_accum=1, save_every=4, eval_every=10
    )
    with_report_to(recipe, "tensorboard")
    stage = tmp_path / "runs" / "tiny" / "sft"
    proc = subprocess.Popen([*QALIGN, "sft", str(recipe)], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    logged = stage / "metrics.jsonl"
    wait_for(
        lambda: (stage / "checkpoints" / "step-4").exists() and logged.read_text().count("\n") >= 6, proc
    )
    proc.kill()
    proc.communicate()

    # A real process, as a user resumes. Event files are read in name order (second, host, pid): the tracker
    # waits into a new second so the resume's file follows the killed attempt's even with a lower pid.
    resumed = qalign_process("sft", str(recipe), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert [r["step"] for r in records(stage)] == list(range(1, 41))
    assert_same_as_metrics(stage)
    assert len(list((stage / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_a_resumed_attempt_event_file_sorts_after_the_earlier_ones(tmp_path):
    """TensorBoard reads event files in name order (second, host, process id): an earlier attempt's file from this
    very second, with a process id that sorts after ours, must still come first."""
    import socket

    from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imported now: open() follows at once)

    paths = StagePaths(tmp_path / "sft")
    paths.tensorboard.mkdir(parents=True)
    # Stamped a second ahead, so that without the tracker's wait ours would share or precede its second.
    stamp = int(time.time()) + 1
    earlier = paths.tensorboard / f"events.out.tfevents.{stamp}.{socket.gethostname()}.999999999.0"
    earlier.write_bytes(b"")
    trackers = Trackers(["tensorboard"], paths)
    trackers.open(3)
    trackers.close()
    names = sorted(p.name for p in paths.tensorboard.glob("events.out.tfevents.*"))
    assert len(names) == 2 and names[0] == earlier.name


def test_tensorboard_resume_hides_the_steps_past_the_checkpoint(tmp_path):
    """The tracker alone: a second attempt resuming at step 3 replaces what the first logged after it."""
    paths = StagePaths(tmp_path / "sft")
    first = Trackers(["tensorboard"], paths)
    first.open(0)
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step), "skipped": False}, step)
    first.close()
    # No pause here: the tracker itself keeps the second attempt's event file after the first one's.
    second = Trackers(["tensorboard"], paths)
    second.open(3)
    for step in range(4, 8):
        second.log({"step": step, "loss": 10.0 * step}, step)
    second.close()
    assert tensorboard_scalars(paths.tensorboard) == {
        "loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    }


class FakeTracker:
    """Stands in for wandb and trackio: records what qalign asks of them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        # The next step the backend expects: past what an earlier attempt logged (wandb's public run.step,
        # trackio's Run._next_step).
        self.step = self._next_step = 0

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step=None):
        self.calls.append(("log", values, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_wandb_and_trackio_get_the_run_name_config_and_steps_and_keep_their_id_on_resume(
    name, tmp_path, monkeypatch
):
    fake = FakeTracker()
    monkeypatch.setitem(sys.modules, name, fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    paths = StagePaths(tmp_path / "dpo")
    trackers = Trackers([name], paths, "tiny-dpo", {"name": "tiny", "report_to": [name]})
    trackers.open(0)
    trackers.log({"step": 2, "loss": 0.5, "rewards/margin": 0.25, "lr": 1e-3, "skipped": True}, 2)
    trackers.close()
    init = fake.calls[0][1]
    assert init["config"] == {"name": "tiny", "report_to": [name]} and init["resume"] == "allow"
    assert init["name"].startswith("tiny-dpo")
    assert fake.calls[1] == ("log", {"loss": 0.5, "rewards/margin": 0.25, "lr": 1e-3}, 2)
    assert fake.calls[2] == ("finish",)
    first_id = init.get("id", init["name"])

    # The first attempt logged up to step 3 and was killed; the checkpoint it resumes from is step 2. The run
    # keeps its id, and step 3, which the backend already holds, is not sent twice.
    fake.step = fake._next_step = 4
    resumed = Trackers([name], paths, "tiny-dpo", {})
    resumed.open(2)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 0.1}, step)
    again = fake.calls[3][1]
    assert again.get("id", again["name"]) == first_id
    assert fake.calls[4:] == [("log", {"loss": 0.1}, 4)]
    fresh = Trackers([name], paths, "tiny-dpo", {})
    fresh.open(0)  # starting over is a new run
    assert fake.calls[5][1].get("id", fake.calls[5][1]["name"]) != first_id


def wandb_records(path: Path):
    """The records of an offline run's .wandb file: a 7-byte header, then LevelDB-log framed protobufs
    (32 KiB blocks; each chunk: crc32, length, type; 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_logs_every_record(tmp_path, tiny_model):
    pytest.importorskip("wandb")
    recipe = with_report_to(write_recipe(tmp_path, tiny_model("llama"), max_steps=3, eval_every=2), "wandb")
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID"):
        env.pop(key, None)
    result = subprocess.run([*QALIGN, "sft", str(recipe)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    stage = tmp_path / "runs" / "tiny" / "sft"
    run_id = json.loads((stage / "trackers.json").read_text())["wandb"]
    (offline,) = (stage / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history, run = {}, None
    for record in wandb_records(offline):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = record.history.item
            values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            history[record.history.step.num] = {k: v for k, v in values.items() if not k.startswith("_")}
        elif kind == "run":
            run = record.run
    assert run.display_name == "tiny-sft" and run.project == "qalign"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["name"] == "tiny" and config["sft"]["max_steps"] == 3 and config["report_to"] == ["wandb"]
    expected = {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in records(stage)}
    assert history.keys() == expected.keys() == {1, 2, 3}
    for step, values in expected.items():
        assert history[step] == pytest.approx(values), step


TRACKIO_RESUME = """
import sys
from pathlib import Path

from qalign.layout import StagePaths
from qalign.trackers import Trackers

paths = StagePaths(Path(sys.argv[1]))
first = Trackers(["trackio"], paths, "tiny-sft", {"name": "tiny"})
first.open(0)
for step in (1, 2, 3):  # killed after logging step 3; its last checkpoint was step 2
    first.log({"step": step, "loss": 1.0 / step}, step)
first.close()
resumed = Trackers(["trackio"], paths, "tiny-sft", {"name": "tiny"})
resumed.open(2)
for step in (3, 4, 5):
    resumed.log({"step": step, "loss": 1.0 / step}, step)
resumed.close()

from trackio.sqlite_storage import SQLiteStorage

(run,) = SQLiteStorage.get_runs("qalign")
print(run, [(log["step"], log["loss"]) for log in SQLiteStorage.get_logs("qalign", run) if "loss" in log])
"""


def test_trackio_resume_continues_the_run_without_duplicated_steps(tmp_path):
    pytest.importorskip("trackio")
    env = {**ENV, "TRACKIO_DIR": str(tmp_path / "trackio")}
    env.pop("TRACKIO_PROJECT", None)
    result = subprocess.run([sys.executable, "-c", TRACKIO_RESUME, str(tmp_path / "sft")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run, logged = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert run.startswith("tiny-sft-")
    assert logged == str([(step, 1.0 / step) for step in range(1, 6)])
