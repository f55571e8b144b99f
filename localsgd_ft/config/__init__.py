"""The experiment schema, the ground floor: one YAML file -> typed, validated config objects.

Both sides read the YAML through :func:`load_config`: the torchx component (to
plan the roles) and every trainer process (to train), so the launch plan and the
training can never disagree. The models are pydantic's; every field carries its
type, range, default and doc, and the reference (docs/config.md) and the JSON
Schema (configs/experiment.schema.json) are generated from them.
"""

from localsgd_ft.config.errors import ConfigError
from localsgd_ft.config.experiment import ExperimentConfig
from localsgd_ft.config.fault_plan import Fault
from localsgd_ft.config.loading import (apply_overrides, describe_source, embed_config, load_config, load_yaml,
                                        parse_config, resolved_text, resolved_yaml, to_dict)
from localsgd_ft.config.reference import json_schema, reference_markdown
from localsgd_ft.config.schedule import (CheckpointConfig, FaultConfig, FaultsConfig, LocalSGDConfig,
                                         OuterOptimizerConfig, TrainConfig)
from localsgd_ft.config.sections import (HEARTBEAT_S, Algorithm, DataConfig, FaultKind, FaultMoment, LighthouseConfig,
                                         ModelArch, ModelConfig, OptimizerConfig, OptimizerName, Recovery,
                                         ReplicaGroupsConfig)

__all__ = [
    "HEARTBEAT_S", "Algorithm", "FaultKind", "FaultMoment", "ModelArch", "OptimizerName", "Recovery",
    "CheckpointConfig", "ConfigError", "DataConfig", "ExperimentConfig", "Fault", "FaultConfig", "FaultsConfig",
    "LighthouseConfig", "LocalSGDConfig", "ModelConfig", "OptimizerConfig", "OuterOptimizerConfig",
    "ReplicaGroupsConfig", "TrainConfig", "apply_overrides", "describe_source", "embed_config", "json_schema",
    "load_config", "load_yaml", "parse_config", "reference_markdown", "resolved_text", "resolved_yaml", "to_dict",
]
