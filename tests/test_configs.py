"""Every file in configs/ parses, validates, and names an architecture the adapter table covers."""

from pathlib import Path

import pytest
import yaml
from conftest import tiny_model

from pipeline.cli import main
from pipeline.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig, validate
from pipeline.models.adapters import layout_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/lm_eval holds lm-eval task files and `sparseact lmeval` files, checked by test_lmeval.py
ALL_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if "lm_eval" not in p.relative_to(CONFIGS).parts)
# A sweep file lists models (the sweep subcommand); every other file configures one run.
SWEEP_FILES = [p for p in ALL_FILES if "models" in (yaml.safe_load(p.read_text()) or {})]
RUN_FILES = [p for p in ALL_FILES if p not in SWEEP_FILES]

# The architecture behind each model config, built tiny and random here (the real
# weights are not downloaded in tests). MobiLlama ships remote code: not checkable offline.
ARCHITECTURE = {
    "smollm2-135m": "llama", "smollm2-360m": "llama", "smollm2-1.7b": "llama", "tinyllama-1.1b": "llama",
    "gemma3-270m": "gemma3", "phi-2": "phi", "phi-1_5": "phi", "qwen2.5-0.5b": "qwen2", "opt-6.7b": "opt",
    "mobillama-0.5b": None, "mobillama-1b": None,
}


def _merged_config(subcommand: str, path: Path, capsys) -> dict:
    """What ``sparseact <subcommand> --config path --print_config`` prints, parsed."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_and_validates(path, capsys):
    merged = _merged_config("run", path, capsys)
    validate(ModelConfig(**merged["model"]), DataConfig(**merged["data"]), ProtocolConfig(**merged["protocol"]),
             RunConfig(**merged["run"]))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_sweep_config_parses_and_validates(path, capsys):
    merged = _merged_config("sweep", path, capsys)
    if merged.get("lmeval"):  # lm-eval cells: their grid is checked cell by cell in test_sweep_lmeval.py
        assert merged["models"] and merged["datasets"] is None
        return
    protocol, run = ProtocolConfig(**merged["protocol"]), RunConfig(**merged["run"])
    assert merged["models"] and merged["datasets"]
    for model in merged["models"]:
        for data in merged["datasets"]:
            validate(ModelConfig(**model), DataConfig(**data), protocol, run)


def test_every_config_file_is_checked():
    assert CONFIGS / "sweep" / "cpu_small.yaml" in SWEEP_FILES and CONFIGS / "demo.yaml" in RUN_FILES


@pytest.mark.parametrize("name", sorted(ARCHITECTURE))
def test_model_config_architecture_is_in_the_adapter_table(name):
    assert (CONFIGS / "models" / f"{name}.yaml").exists()
    if ARCHITECTURE[name] is None:
        pytest.skip("remote modeling code; checked when the model loads")
    layout_for(tiny_model(ARCHITECTURE[name]))


def test_every_model_config_is_listed():
    assert {p.stem for p in (CONFIGS / "models").glob("*.yaml")} == set(ARCHITECTURE)


def test_sweep_list_names_existing_configs():
    for line in (CONFIGS / "sweep.txt").read_text().splitlines():
        for token in line.split():
            if token.endswith(".yaml"):
                assert (CONFIGS.parent / token).exists(), token
