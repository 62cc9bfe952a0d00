"""Tests of encoder loading and of `python -m analysis` on real run folders written to disk."""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from analysis.activations import choose_layer, select_channels
from analysis.cosine import run_labels, split_list
from analysis.loading import LoadError, infer_model_name, load_encoder
from fcmae.registry import create_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT_SIZE = 64
DEAD_FRACTION = 0.75  # of the expansion channels, in stages 2 and 3 of the V1 run


def perturbed_encoder(model_name: str, seed: int) -> torch.nn.Module:
    """Build an encoder whose weights differ from the initialization (GRN included)."""
    torch.manual_seed(seed)
    encoder = create_encoder(model_name)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return encoder


def kill_channels(encoder: torch.nn.Module) -> None:
    """Make DEAD_FRACTION of the expansion channels of stages 2 and 3 output exactly zero."""
    with torch.no_grad():
        for stage in encoder.stages[2:]:
            for block in stage.blocks:
                fc1 = block.mlp.fc1
                num_dead = int(DEAD_FRACTION * fc1.out_channels)
                fc1.weight[:num_dead] = 0.0
                fc1.bias[:num_dead] = -50.0  # GELU(-50) is 0 in float32


def write_config(folder: Path, model_name: str) -> dict:
    config = {"model": model_name, "input_size": INPUT_SIZE, "mask_ratio": 0.6, "patch_size": 32, "epochs": 1,
              "seed": 0}
    (folder / "config.json").write_text(json.dumps(config))
    return config


def write_checkpoint(folder: Path, encoder: torch.nn.Module, config: dict) -> Path:
    model_state = {f"encoder.{key}": value for key, value in encoder.state_dict().items()}
    model_state["decoder.proj.weight"] = torch.randn(512, 320, 1, 1)
    model_state["mask_token"] = torch.zeros(1, 512, 1, 1)
    path = folder / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model_state, "config": config, "epoch": 1, "step": 10}, path)
    return path


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A V1 run with encoder.pth, config.json and a checkpoint; a V2 run with config.json and a checkpoint."""
    root = tmp_path_factory.mktemp("runs")

    v1 = root / "v1_atto"
    v1.mkdir()
    v1_encoder = perturbed_encoder("convnext_atto", seed=1)
    kill_channels(v1_encoder)
    v1_config = write_config(v1, "convnext_atto")
    torch.save(v1_encoder.state_dict(), v1 / "encoder.pth")
    write_checkpoint(v1, v1_encoder, v1_config)

    v2 = root / "v2_atto"
    v2.mkdir()
    v2_encoder = perturbed_encoder("convnextv2_atto", seed=2)
    write_checkpoint(v2, v2_encoder, write_config(v2, "convnextv2_atto"))
    return {"root": root, "v1": v1, "v2": v2}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def tensors_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


# Loading.

def test_load_run_folder_prefers_encoder_file(runs):
    loaded = load_encoder(runs["v1"])

    assert loaded.weights_file.name == "encoder.pth"
    assert loaded.model_name == "convnext_atto"
    assert loaded.version == "v1"
    assert loaded.input_size == INPUT_SIZE
    saved = torch.load(runs["v1"] / "encoder.pth", map_location="cpu", weights_only=True)
    assert tensors_equal(loaded.encoder.state_dict(), saved)


def test_load_run_folder_from_checkpoint(runs):
    loaded = load_encoder(runs["v2"])

    assert loaded.weights_file == runs["v2"] / "checkpoints" / "last.pt"
    assert loaded.model_name == "convnextv2_atto"
    checkpoint = torch.load(loaded.weights_file, map_location="cpu", weights_only=True)
    expected = {key[len("encoder."):]: value for key, value in checkpoint["model"].items()
                if key.startswith("encoder.")}
    assert tensors_equal(loaded.encoder.state_dict(), expected)


def test_load_checkpoint_file_directly(runs):
    loaded = load_encoder(runs["v1"] / "checkpoints" / "last.pt")

    assert loaded.model_name == "convnext_atto"
    assert loaded.config["input_size"] == INPUT_SIZE


@pytest.mark.parametrize("model_name", ["convnext_atto", "convnextv2_atto"])
def test_load_bare_state_dict_infers_model(tmp_path, model_name):
    encoder = perturbed_encoder(model_name, seed=3)
    path = tmp_path / "weights.pth"
    torch.save(encoder.state_dict(), path)

    loaded = load_encoder(path)

    assert loaded.config is None
    assert loaded.model_name == model_name
    assert tensors_equal(loaded.encoder.state_dict(), encoder.state_dict())


def test_infer_model_tells_tiny_from_small():
    with torch.device("meta"):
        small = timm.create_model("convnextv2_small", num_classes=0)

    assert infer_model_name(small.state_dict()) == "convnextv2_small"


def test_load_drops_classifier_of_timm_model(tmp_path):
    model = timm.create_model("convnextv2_atto", num_classes=10)
    path = tmp_path / "classifier.pth"
    torch.save(model.state_dict(), path)

    loaded = load_encoder(path)

    assert loaded.model_name == "convnextv2_atto"
    assert "head.fc.weight" not in loaded.encoder.state_dict()


def test_load_rejects_unknown_dict(tmp_path):
    path = tmp_path / "unknown.pt"
    torch.save({"weights": {"layer": [1, 2]}, "note": "not a model"}, path)

    with pytest.raises(LoadError) as error:
        load_encoder(path)

    assert "weights" in str(error.value)
    assert "note" in str(error.value)


def test_load_rejects_state_dict_of_other_network(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.bias": torch.zeros(10)}, path)

    with pytest.raises(LoadError, match="stem.0.weight.*conv1.weight"):
        load_encoder(path)


def test_load_names_mismatched_keys(tmp_path, runs):
    run = tmp_path / "wrong_config"
    run.mkdir()
    torch.save(torch.load(runs["v1"] / "encoder.pth", weights_only=True), run / "encoder.pth")
    write_config(run, "convnextv2_atto")

    with pytest.raises(LoadError) as error:
        load_encoder(run)

    message = str(error.value)
    assert "missing keys" in message
    assert "mlp.grn.weight" in message
    assert "unexpected keys" in message
    assert ".gamma" in message


def test_load_rejects_pickled_objects(tmp_path):
    path = tmp_path / "namespace.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)

    with pytest.raises(LoadError, match="weights_only=True.*argparse.Namespace"):
        load_encoder(path)


def test_load_rejects_folder_without_weights(tmp_path):
    with pytest.raises(LoadError, match="neither encoder.pth nor checkpoints/last.pt"):
        load_encoder(tmp_path)


def test_split_list_accepts_lists_and_commas():
    assert split_list("a,b, c") == ["a", "b", "c"]
    assert split_list(["a,b", ("c",)]) == ["a", "b", "c"]
    assert split_list(None) == []


def test_run_labels_are_unique(tmp_path):
    (tmp_path / "x" / "run").mkdir(parents=True)
    (tmp_path / "y" / "run").mkdir(parents=True)
    weights = tmp_path / "weights.pth"
    weights.touch()

    labels = run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run", weights])

    assert labels == ["run", "run-2", "weights"]


def test_run_labels_name_files_by_run(runs):
    paths = [runs["v1"] / "encoder.pth", runs["v1"] / "checkpoints" / "last.pt",
             runs["v2"] / "checkpoints" / "last.pt"]

    labels = run_labels(paths)

    assert labels == ["v1_atto-encoder", "v1_atto-last", "v2_atto-last"]


# Layer and channel choice for the activation figure.

def test_choose_layer_uses_largest_version_gap():
    rows = [{"run": "a", "version": "v1", "layer": k, "distance": 0.45 - 0.3 * (k == 2)} for k in range(4)]
    rows += [{"run": "b", "version": "v2", "layer": k, "distance": 0.45} for k in range(4)]

    layer, reason = choose_layer(rows)

    assert layer == 2
    assert "V1 lower by 0.300" in reason


def test_choose_layer_without_both_versions_takes_lowest():
    rows = [{"run": "b", "version": "v2", "layer": k, "distance": 0.5 - 0.1 * (k == 1)} for k in range(4)]

    layer, _ = choose_layer(rows)

    assert layer == 1


def test_select_channels_depends_on_seed_and_width_only():
    first = select_channels(640, 64, seed=0)

    assert torch.equal(first, select_channels(640, 64, seed=0))
    assert not torch.equal(first, select_channels(640, 64, seed=1))
    assert len(set(first.tolist())) == 64
    assert first.tolist() == sorted(first.tolist())


# Command line.

@pytest.fixture(scope="session")
def cosine_result(runs) -> subprocess.CompletedProcess:
    return run_cli("cosine", str(runs["v1"]), str(runs["v2"]), "--batch_size", "4")


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_cli_cosine_writes_csv_json_tensorboard(runs, cosine_result):
    assert cosine_result.returncode == 0, cosine_result.stderr
    root = runs["root"]
    csv_path = root / "cosine_distance.csv"
    assert str(csv_path) in cosine_result.stdout.splitlines()

    rows = read_rows(csv_path)
    assert list(rows[0]) == ["run", "model", "version", "layer", "stage", "block", "normalized_layer",
                             "distance", "dead_fraction"]
    assert len([row for row in rows if row["run"] == "v1_atto"]) == 12
    assert len([row for row in rows if row["run"] == "v2_atto"]) == 12
    assert {row["version"] for row in rows} == {"v1", "v2"}
    assert all(0.0 <= float(row["distance"]) <= 1.0 for row in rows)

    v1_late = [row for row in rows if row["run"] == "v1_atto" and int(row["stage"]) >= 2]
    assert all(float(row["dead_fraction"]) == pytest.approx(DEAD_FRACTION) for row in v1_late)

    document = json.loads((root / "cosine_distance.json").read_text())
    assert document["images"]["count"] == 9
    assert document["input_size"] == {"v1_atto": INPUT_SIZE, "v2_atto": INPUT_SIZE}
    assert len(document["rows"]) == 24


def test_cli_cosine_tensorboard_scalars(runs, cosine_result):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cosine_result.returncode == 0, cosine_result.stderr
    rows = read_rows(runs["root"] / "cosine_distance.csv")
    for label in ("v1_atto", "v2_atto"):
        events = EventAccumulator(str(runs["root"] / "tensorboard" / "cosine" / label))
        events.Reload()
        scalars = events.Scalars("cosine/feature_cosine_distance")
        expected = [float(row["distance"]) for row in rows if row["run"] == label]
        assert [scalar.step for scalar in scalars] == list(range(12))
        assert [scalar.value for scalar in scalars] == pytest.approx(expected, abs=1e-6)


def test_cli_cosine_logs_table(cosine_result):
    assert "feature cosine distance per layer" in cosine_result.stderr
    assert "v1_atto" in cosine_result.stderr


def test_cli_figures_writes_png_and_pdf(runs, cosine_result):
    assert cosine_result.returncode == 0, cosine_result.stderr

    result = run_cli("figures", str(runs["root"]))

    assert result.returncode == 0, result.stderr
    png = runs["root"] / "cosine_distance.png"
    pdf = runs["root"] / "cosine_distance.pdf"
    assert png.stat().st_size > 10_000
    assert pdf.read_bytes().startswith(b"%PDF")


def test_cli_activations_writes_figures(runs, cosine_result):
    assert cosine_result.returncode == 0, cosine_result.stderr

    result = run_cli("activations", f"{runs['v1']},{runs['v2']}")

    assert result.returncode == 0, result.stderr
    assert "the layer where V1 and V2 distances differ most" in result.stderr
    for name in ("activations.png", "activations_v1_atto.png", "activations_v2_atto.png"):
        path = runs["root"] / name
        assert str(path) in result.stdout.splitlines()
        assert path.stat().st_size > 10_000


def test_cli_missing_path_fails_clearly(tmp_path):
    missing = tmp_path / "no_such_run"

    result = run_cli("cosine", str(missing))

    assert result.returncode == 2
    assert f"path '{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unknown_layer_fails_clearly(runs, tmp_path):
    result = run_cli("activations", str(runs["v1"]), "--layer", "99", "--output_dir", str(tmp_path))

    assert result.returncode == 2
    assert "--layer 99 is not a valid layer index" in result.stderr
    assert "0..11" in result.stderr
    assert not (tmp_path / "activations.png").exists()


def test_cli_figures_without_csv_fails_clearly(tmp_path):
    result = run_cli("figures", str(tmp_path))

    assert result.returncode == 2
    assert "cosine_distance.csv does not exist" in result.stderr


def test_cli_unknown_option_fails_before_running(runs, tmp_path):
    result = run_cli("cosine", str(runs["v1"]), "--output_dir", str(tmp_path), "--max_image", "3")

    assert result.returncode == 2
    assert "unknown option --max_image for 'cosine'" in result.stderr
    assert "--max_images" in result.stderr
    assert not (tmp_path / "cosine_distance.csv").exists()


def test_replacing_keeps_old_file_on_error(tmp_path):
    from analysis.cosine import replacing

    path = tmp_path / "cosine_distance.csv"
    path.write_text("old complete file\n")

    with pytest.raises(RuntimeError):
        with replacing(path) as file:
            file.write("half of a new fi")
            raise RuntimeError("measurement failed mid-write")

    assert path.read_text() == "old complete file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cosine_distance.csv"]


def test_replacing_swaps_in_new_file(tmp_path):
    from analysis.cosine import replacing

    path = tmp_path / "cosine_distance.csv"
    path.write_text("old\n")
    with replacing(path) as file:
        file.write("new\n")
        assert path.read_text() == "old\n"

    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cosine_distance.csv"]
