"""atas: fast adversarial training with adaptive step size (ATAS) and its peers, evaluated honestly.

    import atas
    cfg = atas.load_config("fmnist", ["method.name=atas", "train.epochs=5"])
    run = atas.train(cfg)                      # checkpoints, metrics, probe in runs/<name>/
    report = atas.evaluate(run.model, x_test, y_test, eps=cfg.method.eps)
"""
__version__ = "0.1.0"

from atas.config import Config, ConfigError, load_config, parse_fraction  # noqa: E402
from atas.evaluate import evaluate, format_table  # noqa: E402
from atas.export import export_model, load_model  # noqa: E402
from atas.trainer import train  # noqa: E402

__all__ = ["Config", "ConfigError", "load_config", "parse_fraction", "train", "evaluate", "format_table",
           "export_model", "load_model", "__version__"]
