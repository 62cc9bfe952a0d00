"""Invalid options are rejected by the launcher before anything is submitted or written.

Each option case runs `run_with_submitit.main` in this process, and the cases marked
SUBPROCESS_CASES also run `run_with_submitit.py pretrain` as a real process (each spends
seconds importing torch). Both check the exit status 2, the message (option, value and
what is valid) and that no output folder was created. Options already covered by
tests/test_cli.py (unknown model, mask ratio 0 and 1.2, input size 100, data path
missing or empty, batch size 0, warmup longer than training, negative workers, GPUs
with --cluster local) are not repeated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fcmae.config import ConfigError, PretrainConfig, load_config, save_config
from run_with_submitit import main, prepare_output_dir
from tests.conftest import write_photos

ROOT = Path(__file__).resolve().parent.parent
# setpriv runs the launcher as root without the capabilities that let root ignore file modes.
WITHOUT_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]

OPTION_CASES = {
    "epochs_zero": (["--epochs", "0", "--warmup_epochs", "0"], "invalid --epochs 0: it must be positive"),
    "epochs_negative": (["--epochs", "-3", "--warmup_epochs", "0"], "invalid --epochs -3: it must be positive"),
    "batch_negative": (["--batch_size", "-2"], "invalid --batch_size -2: it must be positive"),
    "update_freq_zero": (["--update_freq", "0"], "invalid --update_freq 0: it must be positive"),
    "mask_ratio_one": (["--mask_ratio", "1"], "invalid --mask_ratio 1.0: it must lie in (0, 1)"),
    "mask_ratio_negative": (["--mask_ratio", "-0.1"], "invalid --mask_ratio -0.1: it must lie in (0, 1)"),
    "input_not_multiple": (["--input_size", "48"],
                           "invalid --input_size 48: it must be a positive multiple of the patch size 32"),
    "input_zero": (["--input_size", "0"], "invalid --input_size 0: it must be a positive multiple"),
    "max_bad_above_one": (["--max_bad_fraction", "1.5"], "invalid --max_bad_fraction 1.5: it must lie in [0, 1]"),
    "max_bad_negative": (["--max_bad_fraction", "-0.01"],
                         "invalid --max_bad_fraction -0.01: it must lie in [0, 1]"),
    "data_is_file": (["--data", "{tmp}/file.jpg"], "is not a folder; pass a folder of images"),
    "data_without_images": (["--data", "{tmp}/no_images"], "contains no images with extensions .jpg"),
}


SUBPROCESS_CASES = ("epochs_zero", "max_bad_above_one", "data_is_file")


def launch(args: list[str], prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, str(ROOT / "run_with_submitit.py"), "pretrain", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def option_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("options")
    write_photos(tmp / "photos", 4)
    (tmp / "file.jpg").write_bytes((tmp / "photos" / "img_000.jpg").read_bytes())
    write_photos(tmp / "no_images" / ".hidden", 2)
    (tmp / "no_images" / "readme.txt").write_text("labels")
    return tmp


def case_arguments(case: str, folder: Path, output_dir: Path) -> list[str]:
    args = [arg.replace("{tmp}", str(folder)) for arg in OPTION_CASES[case][0]]
    if "--data" not in args:
        args += ["--data", str(folder / "photos")]
    return ["--output_dir", str(output_dir), "--cluster", "local", *args]


@pytest.mark.parametrize("case", OPTION_CASES)
def test_invalid_option_exits_before_submitting(option_folder, capsys, case):
    output_dir = option_folder / f"run_{case}"
    assert main(["pretrain", *case_arguments(case, option_folder, output_dir)]) == 2
    assert OPTION_CASES[case][1] in capsys.readouterr().err
    assert not output_dir.exists()


def test_invalid_option_exits_in_real_process(option_folder):
    def run(case):
        output_dir = option_folder / f"process_{case}"
        return case, output_dir, launch(case_arguments(case, option_folder, output_dir))

    with ThreadPoolExecutor(max_workers=len(SUBPROCESS_CASES)) as pool:
        for case, output_dir, result in pool.map(run, SUBPROCESS_CASES):
            assert result.returncode == 2, (case, result.stderr)
            assert result.stderr.startswith("error: invalid --")
            assert OPTION_CASES[case][1] in result.stderr
            assert "Traceback" not in result.stderr
            assert not output_dir.exists()


def test_max_bad_fraction_bounds_are_valid(photo_dir):
    for value in (0.0, 0.01, 1.0):
        PretrainConfig(data=str(photo_dir), max_bad_fraction=value).validate()
    with pytest.raises(ConfigError, match=r"invalid --max_bad_fraction 1.01"):
        PretrainConfig(data=str(photo_dir), max_bad_fraction=1.01).validate()


@pytest.fixture
def locked_folders(tmp_path):
    """A data folder without read permission, and one inside a folder without search permission."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed; as root, file modes cannot be enforced otherwise")
    tmp_path.chmod(0o755)
    unreadable = tmp_path / "unreadable"
    write_photos(unreadable, 2)
    unreadable.chmod(0o000)
    closed_parent = tmp_path / "closed"
    write_photos(closed_parent / "data", 2)
    closed_parent.chmod(0o000)
    try:
        yield unreadable, closed_parent / "data"
    finally:
        unreadable.chmod(0o755)
        closed_parent.chmod(0o755)


def test_unreadable_data_folder_is_rejected(locked_folders, tmp_path):
    unreadable, behind_closed_parent = locked_folders
    for data, message in ((unreadable, "is not readable; check its permissions"),
                          (behind_closed_parent, "permission denied on a parent folder")):
        output_dir = tmp_path / f"run_{data.name}"
        result = launch(["--data", str(data), "--output_dir", str(output_dir), "--cluster", "local"],
                        prefix=WITHOUT_DAC_OVERRIDE)
        assert result.returncode == 2, result.stderr
        assert f"invalid --data: data path '{data}'" in result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert not output_dir.exists()


def write_previous_run(output_dir: Path, photos: Path, mask_ratio: float) -> dict[str, bytes]:
    """Write a run folder as a finished run leaves it; return {relative path: content}."""
    save_config(PretrainConfig(data=str(photos), output_dir=str(output_dir), mask_ratio=mask_ratio), output_dir)
    (output_dir / "checkpoints").mkdir()
    (output_dir / "checkpoints" / "last.pt").write_bytes(b"weights of the old run")
    (output_dir / "logs").mkdir()
    (output_dir / "logs" / "rank0.log").write_text("old log\n")
    return {str(p.relative_to(output_dir)): p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_output_folder_with_other_config_is_refused(photo_dir, tmp_path):
    output_dir = tmp_path / "run"
    before = write_previous_run(output_dir, photo_dir, mask_ratio=0.6)

    result = launch(["--data", str(photo_dir), "--output_dir", str(output_dir), "--cluster", "local",
                     "--mask_ratio", "0.5", "--batch_size", "4"])
    assert result.returncode == 2, result.stderr
    assert f"output folder {output_dir} holds a run with a different config" in result.stderr
    assert "mask_ratio: saved 0.6, requested 0.5" in result.stderr
    assert "--resume" in result.stderr
    assert "--force" in result.stderr
    assert folder_contents(output_dir) == before


def test_resume_keeps_saved_config(photo_dir, tmp_path):
    output_dir = tmp_path / "run"
    before = write_previous_run(output_dir, photo_dir, mask_ratio=0.6)
    requested = PretrainConfig(data=str(photo_dir), output_dir=str(output_dir), mask_ratio=0.5)

    config = prepare_output_dir(requested, resume=True, force=False)
    assert config.mask_ratio == 0.6
    assert folder_contents(output_dir) == before


def test_force_moves_old_run_aside(photo_dir, tmp_path):
    output_dir = tmp_path / "run"
    before = write_previous_run(output_dir, photo_dir, mask_ratio=0.6)
    earlier_archive = output_dir / "replaced-20200101-000000"
    earlier_archive.mkdir()
    (earlier_archive / "config.json").write_text("{}")
    requested = PretrainConfig(data=str(photo_dir), output_dir=str(output_dir), mask_ratio=0.5)

    with pytest.raises(ConfigError, match="holds a run with a different config"):
        prepare_output_dir(requested, resume=False, force=False)
    config = prepare_output_dir(requested, resume=False, force=True)

    assert config.mask_ratio == 0.5
    archives = sorted(p.name for p in output_dir.iterdir())
    assert len(archives) == 2 and all(name.startswith("replaced-") for name in archives)
    new_archive = output_dir / archives[1]
    assert folder_contents(new_archive) == before
    assert (earlier_archive / "config.json").read_text() == "{}"
    assert load_config(new_archive).mask_ratio == 0.6
    assert json.loads((new_archive / "config.json").read_text())["mask_ratio"] == 0.6
