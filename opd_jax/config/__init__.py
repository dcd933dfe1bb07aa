"""Typed experiment configs: YAML files with `extends`, dotted `key=value` overrides, sweeps.

```python
cfg = load_config("configs/base.yaml", ["optim.learning_rate=1e-4", "teachers.0.model.preset=qwen3-8b"])
save_config(cfg, cfg.run_dir)  # writes <run_dir>/config.yaml, loadable again by load_config
for run in expand_sweep("configs/sweeps/example.yaml"):
    print(run.name, run.command())
```
"""

from opd_jax.config.loader import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    to_yaml,
)
from opd_jax.config.schema import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    ExperimentConfig,
    LoggingConfig,
    LoRAConfig,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    SamplingConfig,
    TeacherConfig,
)
from opd_jax.config.sweep import SweepRun, expand_sweep
from opd_jax.config.validate import validate

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LoRAConfig",
    "LoggingConfig",
    "LossConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "SamplingConfig",
    "SweepRun",
    "TeacherConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "expand_sweep",
    "load_config",
    "save_config",
    "to_yaml",
    "validate",
]
