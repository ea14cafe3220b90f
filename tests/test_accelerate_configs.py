"""The shipped accelerate configs load as `accelerate launch --config_file` reads them: no unknown keys, and
every FSDP / DeepSpeed option is one the launcher has (a misspelt option would otherwise be dropped silently)."""

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml"))


def test_there_are_configs_for_each_setup():
    assert {p.stem for p in CONFIGS} >= {"single-gpu", "multi-gpu", "multi-node", "deepspeed-zero2", "fsdp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_names_only_launcher_options(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(path)
    assert config.num_processes >= config.num_machines >= 1
    options = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(raw.get(section) or {}) - options
        assert not unknown, f"{path.name}: {section} keys accelerate launch does not know: {sorted(unknown)}"
    assert path.read_text().startswith("# accelerate launch"), f"{path.name}: first line should give the command"
